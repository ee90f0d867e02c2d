"""A gateway in its own process for benchmarks: seeded store, readiness, memory, tasks.

The load generator runs in the benchmark's process, never the server's, so what the
server costs is measured apart from what simulating callers costs.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
FAQ_CSV = ROOT / "cache_seed" / "examples" / "bank_faq.csv"
# Paraphrases of the example FAQ that are not in the seed (each routes to a cached answer).
FAQ_PARAPHRASES = [
    "what time do your branches open on saturday",
    "which routing number do I give my employer for my paycheck",
    "I forgot the password for online banking",
    "what is the swift code for an international transfer",
    "are your branches open on the weekend",
    "where can I find your routing number",
    "I can't log in to online banking, how do I get a new password",
    "what code do I need for a wire from abroad",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seed_store(store: str | None = None) -> str:
    """A store seeded with the example bank FAQ (real voice); ``store`` if given."""
    if store is not None:
        return store
    store = tempfile.mkdtemp(prefix="vg-bench-store-")
    seed = subprocess.run([sys.executable, "-m", "gateway.cli", "seed", "--quiet", "--store",
                           store, str(FAQ_CSV)], capture_output=True, text=True)
    if seed.returncode != 0:
        sys.exit(f"seeding failed: {seed.stderr}")
    print(seed.stdout.strip())
    return store


class GatewayProcess:
    def __init__(self, store: str, env: dict[str, str] | None = None,
                 tree: str | Path | None = None) -> None:
        """``tree``: run the gateway from this source tree (e.g. ``git archive`` of an
        earlier commit), to compare two versions in one run."""
        self.port = free_port()
        # Absolute: a gateway run from another tree (``tree``) has another working directory.
        store = str(Path(store).resolve())
        self.env = dict(os.environ, VOICEGATE_STORE_DIR=store, VOICEGATE_LOG_LEVEL="warning",
                        **(env or {}))
        # `python -m` puts its working directory first on sys.path: that decides the tree.
        self.tree = Path(tree).resolve() if tree is not None else None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def call_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/call"

    @property
    def twilio_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/twilio/stream"

    def start(self, timeout_s: float = 300.0) -> "GatewayProcess":
        self.proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--host",
                                      "127.0.0.1", "--port", str(self.port)], env=self.env,
                                     cwd=self.tree)
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                sys.exit("the gateway did not become ready")
            time.sleep(0.2)
        return self

    def ready(self) -> bool:
        try:
            return httpx.get(self.base_url + "/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def alive(self) -> bool:
        """The process runs and answers /healthz."""
        if self.proc is None or self.proc.poll() is not None:
            return False
        try:
            return httpx.get(self.base_url + "/healthz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def readiness(self) -> dict[str, Any]:
        return httpx.get(self.base_url + "/readyz", timeout=10).json()

    def tasks(self) -> int:
        """The server's pending asyncio tasks (a leak shows as a count that only grows)."""
        return int(self.readiness().get("tasks", -1))

    def rss_mb(self) -> float:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
        return float("nan")

    def cpu_s(self) -> float:
        """User + system CPU seconds the server has used."""
        assert self.proc is not None
        return process_cpu_s(self.proc.pid)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Balancer:
    """HAProxy in the foreground on the repository's own config (deploy/haproxy.cfg), in
    front of the replicas at ``replica_ports`` (that file lists two)."""

    CONFIG = ROOT / "deploy" / "haproxy.cfg"
    MAX_REPLICAS = 2

    def __init__(self, directory: Path, replica_ports: list[int]) -> None:
        if not 1 <= len(replica_ports) <= self.MAX_REPLICAS:
            raise ValueError(f"deploy/haproxy.cfg lists {self.MAX_REPLICAS} replicas, "
                             f"not {len(replica_ports)}")
        self.port = free_port()
        self.url = f"ws://127.0.0.1:{self.port}/v1/call"
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log = Path(directory) / "haproxy.log"
        # One replica: the second line points at it too, so the file runs unchanged.
        ports = replica_ports + replica_ports[:1] * (self.MAX_REPLICAS - len(replica_ports))
        env = dict(os.environ, VG_LB_BIND=f"127.0.0.1:{self.port}",
                   **{f"VG_REPLICA_{i}": f"127.0.0.1:{port}" for i, port in enumerate(ports, 1)})
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(["haproxy", "-db", "-f", str(self.CONFIG)], env=env,
                                            stdout=out, stderr=subprocess.STDOUT)

    def wait_up(self) -> None:
        """Every replica in rotation: HAProxy marks one up after two good health checks."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"haproxy exited:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.base_url + "/readyz", timeout=5).status_code == 200:
                    time.sleep(2.5)  # the other replicas' second checks
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"haproxy forwards nothing:\n{self.log.read_text()[-3000:]}")

    def cpu_s(self) -> float:
        return process_cpu_s(self.process.pid)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


class Cluster:
    """``replicas`` gateway processes on one store behind HAProxy: what a benchmark drives
    in place of one ``GatewayProcess`` (CPU and memory are the replicas' sums)."""

    def __init__(self, store: str, replicas: int, env: dict[str, str] | None = None,
                 tree: str | Path | None = None) -> None:
        if replicas > Balancer.MAX_REPLICAS:
            raise ValueError(f"deploy/haproxy.cfg lists {Balancer.MAX_REPLICAS} replicas")
        self.replicas = [GatewayProcess(store, env, tree=tree) for _ in range(replicas)]
        self._directory = tempfile.mkdtemp(prefix="vg-bench-lb-")
        self.balancer: Balancer | None = None

    @property
    def call_url(self) -> str:
        assert self.balancer is not None
        return self.balancer.url

    def start(self) -> "Cluster":
        if shutil.which("haproxy") is None:  # before the replicas load their models
            sys.exit("--replicas 2 runs HAProxy, which is not installed: "
                     "bash scripts/ensure-haproxy.sh")
        for replica in self.replicas:
            replica.start()
        self.balancer = Balancer(Path(self._directory), [r.port for r in self.replicas])
        self.balancer.wait_up()
        return self

    def cpu_s(self) -> float:
        return sum(r.cpu_s() for r in self.replicas)

    def balancer_cpu_s(self) -> float:
        return self.balancer.cpu_s() if self.balancer is not None else 0.0

    def rss_mb(self) -> float:
        return sum(r.rss_mb() for r in self.replicas)

    def stop(self) -> None:
        if self.balancer is not None:
            self.balancer.stop()
        for replica in self.replicas:
            replica.stop()
