FROM python:3.11-slim
WORKDIR /app
ENV PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PIP_NO_CACHE_DIR=1
# CPU PyTorch first, pinned, so nothing pulls CUDA wheels. Pass extra pip flags
# (an index that serves the CPU build) with --build-arg TORCH_PIP_FLAGS=...
ARG TORCH_PIP_FLAGS=""
RUN pip install torch==2.13.0 ${TORCH_PIP_FLAGS}
COPY pyproject.toml README.md ./
COPY gateway gateway
COPY intents intents
COPY cache_seed cache_seed
RUN pip install '.[cloud]'
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/readyz').status != 200)"
CMD ["voicegate", "serve", "--host", "0.0.0.0", "--port", "8080"]
