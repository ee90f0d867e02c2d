# Two targets a new user needs: `make demo` and `make test`. Both install first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Where pip finds the CPU build of torch==2.13.0 (extra pip flags, e.g. an extra index URL).
TORCH_PIP_FLAGS ?=

.PHONY: install demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	# CPU PyTorch first, pinned, so nothing that depends on torch pulls CUDA wheels.
	$(PY) -m pip install --quiet torch==2.13.0 $(TORCH_PIP_FLAGS)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

demo: install
	$(VENV)/bin/voicegate demo

test: install
	bash scripts/ensure-redis.sh
	bash scripts/ensure-browser.sh
	bash scripts/ensure-haproxy.sh
	bash scripts/ensure-node.sh
	# Two workers, a module's tests on one (its fixtures load once): ~10 min, not ~18, on
	# two cores, most tests waiting on processes, sockets or a model on the other core.
	$(PY) -m pytest -n 2 --dist loadfile

bench: install
	$(PY) bench/speech_stack.py

clean:
	rm -rf $(VENV) demo-out .pytest_cache
