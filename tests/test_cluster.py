"""Several replicas behind a real HAProxy (deploy/haproxy.cfg), one drained then killed.

HAProxy (scripts/ensure-haproxy.sh installs it), two ``voicegate serve`` processes and the
suite's Redis database (``VOICEGATE_TEST_REDIS_DB``), all on 127.0.0.1. Callers only ever
know the balancer's URL. Text turns on a tiny seed keep the runtime modest. The same
config as docker-compose.yml runs it (replicas by name, a fake of Docker's DNS) is at the
end, on stand-in replicas at 127.0.0.2 and 127.0.0.3.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
from websockets.exceptions import InvalidStatus
import pytest
import uvicorn
import yaml

from bench.gateway_process import Balancer, free_port
from gateway.client import Caller
from gateway.app import create_app
from gateway.drain import DrainingServer, wait_until_idle
from gateway.clock import ManualClock
from gateway.server import uvicorn_options
from gateway.services import Services
from tests.fakes.dns_server import FakeDNS
from tests.test_redis import (FAQ, Replica, redis_url, seed_through_cli,  # noqa: F401
                              unavailable, wait_until, write_small_faq)

QUESTIONS = [questions[0] for _answer, questions in FAQ.values()]


def calls_on(replica: Replica) -> set[str]:
    """Ids of the calls this replica started (its structured log)."""
    ids = set()
    for line in replica.log.read_text(errors="replace").splitlines():
        if '"call_started"' in line:
            try:
                ids.add(json.loads(line)["call_id"])
            except (ValueError, KeyError):
                pass
    return ids


class LongCall:
    """A caller on the balancer asking cached questions turn after turn until told to stop;
    everything that goes wrong is kept."""

    def __init__(self, url: str, name: str) -> None:
        self.url, self.name = url, name
        self.caller = Caller(url)
        self.turns: list[dict[str, Any]] = []
        self.problems: list[str] = []
        self.call_id = ""
        self._stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def open(self) -> None:
        await self.caller.connect()
        assert self.caller.ready is not None
        self.call_id = self.caller.ready["call_id"]
        self.task = asyncio.create_task(self._talk())

    async def _talk(self) -> None:
        i = 0
        while not self._stop.is_set():
            question = QUESTIONS[i % len(QUESTIONS)]
            i += 1
            try:
                turn = await self.caller.say_text(question, timeout=60)
            except (ConnectionError, TimeoutError, OSError) as exc:
                self.problems.append(f"{type(exc).__name__}: {exc}")
                return
            response = turn.first("response")
            errors = [e for e in turn.events if e.get("type") == "error"]
            if response is None or response.get("source") != "cache" or errors:
                self.problems.append(f"turn {question!r}: {response} {errors}")
            self.turns.append(response or {})

    async def finish(self) -> None:
        self._stop.set()
        if self.task is not None:
            await asyncio.wait_for(self.task, 90)
        await self.caller.close()


@pytest.fixture
def balanced(redis_url: str, tmp_path: Path) -> Iterator[tuple[Balancer, Replica, Replica]]:
    if shutil.which("haproxy") is None:
        unavailable("haproxy is not installed (scripts/ensure-haproxy.sh)")
    csv = tmp_path / "faq.csv"
    write_small_faq(csv)
    seed_through_cli(csv, redis_url)
    env = {"VOICEGATE_DRAIN_TIMEOUT_S": "120", "VOICEGATE_TURN_MODEL": "none"}
    replicas = [Replica(name, redis_url, tmp_path, env) for name in ("a", "b")]
    balancer: Balancer | None = None
    try:
        for replica in replicas:
            replica.wait_ready()
        balancer = Balancer(tmp_path, [r.port for r in replicas])
        yield balancer, replicas[0], replicas[1]
    finally:
        if balancer is not None:
            balancer.stop()
        for replica in replicas:
            replica.stop()


def ready_status(replica: Replica) -> int:
    return httpx.get(replica.base_url + "/readyz", timeout=10).status_code


@pytest.mark.slow
async def test_calls_spread_and_a_drained_then_killed_replica_goes_unnoticed(
        balanced: tuple[Balancer, Replica, Replica]) -> None:
    lb, a, b = balanced
    lb.wait_up()

    # Calls spread over both replicas (least connections).
    calls = [LongCall(lb.url, f"first-{i}") for i in range(4)]
    for call in calls:
        await call.open()
    await wait_until(lambda: a.ready()["active_calls"] == 2 and b.ready()["active_calls"] == 2,
                     "two calls on each replica", timeout=30)
    on_a = [c for c in calls if c.call_id in calls_on(a)]
    on_b = [c for c in calls if c.call_id in calls_on(b)]
    assert len(on_a) == 2 and len(on_b) == 2, (calls_on(a), calls_on(b))
    await wait_until(lambda: all(len(c.turns) >= 1 for c in calls), "a first turn on every call")

    # SIGTERM: replica a drains. It leaves the rotation; its calls go on.
    a.process.send_signal(signal.SIGTERM)
    await wait_until(lambda: ready_status(a) == 503, "replica a reports 503 while draining",
                     timeout=30)
    body = a.ready()
    assert body["draining"] is True and body["ready"] is False and body["active_calls"] == 2
    turns_before = [len(c.turns) for c in on_a]
    # New calls at once, while HAProxy may not have seen the 503 yet: an upgrade that
    # reaches a is refused with 503 and retried on b. All land on b and get cache hits.
    during = [LongCall(lb.url, f"during-{i}") for i in range(3)]
    for call in during:
        await call.open()
    assert not {c.call_id for c in during} & calls_on(a)
    await wait_until(lambda: all(len(c.turns) > n for c, n in zip(on_a, turns_before)),
                     "the draining replica's calls finish more turns", timeout=60)
    assert a.process.poll() is None  # still serving its calls
    await wait_until(lambda: all(len(c.turns) >= 1 for c in during), "hits for the new calls")

    # The orchestrator's patience ends: a is killed with a call still on it.
    await on_a[0].finish()
    a.process.kill()
    a.process.wait(timeout=10)
    after = [LongCall(lb.url, f"after-{i}") for i in range(3)]
    for call in after:
        await call.open()
    await wait_until(lambda: all(len(c.turns) >= 2 for c in after), "hits after the kill")
    survivors = [*on_b, *during, *after]
    await wait_until(lambda: all(len(c.turns) >= 2 for c in survivors), "survivors talk on")
    for call in survivors:
        await call.finish()
    await on_a[1].finish()

    # Nobody on the survivor noticed: every turn a cache hit, no error, no disconnect.
    for call in survivors:
        assert call.call_id in calls_on(b), call.name
        assert call.problems == [], (call.name, call.problems)
        assert all(t.get("source") == "cache" for t in call.turns)
    assert b.ready()["ready"] is True
    # The first of a's calls ended cleanly during the drain (its turns were all hits).
    assert on_a[0].problems == []


async def test_the_drain_waits_for_the_last_call_or_its_timeout() -> None:
    clock = ManualClock()
    active = [2]
    waiting = asyncio.ensure_future(wait_until_idle(lambda: active[0], 30.0, clock))
    await clock.advance(5)
    assert not waiting.done()
    active[0] = 0
    await clock.advance(0.2)
    assert waiting.done() and waiting.result() == 0

    # Calls that outlast the timeout are left to the shutdown (counted).
    active[0] = 3
    waiting = asyncio.ensure_future(wait_until_idle(lambda: active[0], 30.0, clock))
    await clock.advance(29.5)
    assert not waiting.done()
    await clock.advance(1.0)
    assert waiting.done() and waiting.result() == 3


async def test_a_draining_replica_refuses_new_calls_and_keeps_its_own(server) -> None:
    services = server.app.state.services
    async with Caller(server.call_url) as running:
        waiting = Caller(server.call_url)
        await waiting.connect(start=False)  # upgraded before the drain, `start` after it
        services.begin_drain()
        try:
            ready = httpx.get(server.base_url + "/readyz", timeout=10)
            assert ready.status_code == 503 and ready.json()["draining"] is True
            # A new upgrade: HTTP 503 (HAProxy retries it elsewhere).
            with pytest.raises(InvalidStatus) as refused:
                await Caller(server.call_url).connect()
            assert refused.value.response.status_code == 503
            # A `start` that still reaches it: `draining`, close 1013.
            await waiting.send_json({"type": "start", "sample_rate": 16000,
                                     "encoding": "pcm16"})
            error = await waiting.wait_for("error", timeout=10)
            assert error["code"] == "draining"
            with pytest.raises(ConnectionError):
                await waiting.wait_for("never", timeout=10)
            assert waiting.closed_code == 1013
            # The call that was running goes on.
            turn = await running.say_text("What are your opening hours?", timeout=60)
            assert turn.first("response") is not None
        finally:
            services.admission.draining = False
            await waiting.close()
    assert httpx.get(server.base_url + "/readyz", timeout=10).status_code == 200


def wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` seconds pass; whether it held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.mark.slow
def test_a_drained_replica_exits_even_when_a_request_never_finishes(settings, runtime) -> None:
    """SIGTERM drains: running calls get drain_timeout_s, then "the process shuts down and
    uvicorn closes what is left with 1012" (docs/operations.md), and "a second SIGTERM ...
    exits at once". But the DrainingServer runs uvicorn with no graceful-shutdown bound
    (gateway/server.py uvicorn_options: no timeout_graceful_shutdown), and uvicorn's shutdown
    waits for every connection to finish. One HTTP request whose body never completes (here an
    unauthenticated POST /twilio/voice that declared 64 bytes and sent 10; a WebSocket whose
    peer stopped reading should do the same, its transport unable to close while its buffer
    is unsent) keeps the replica alive forever after its drain, and the second SIGTERM only sets should_exit again (gateway/drain.py
    handle_exit -> uvicorn handle_exit: only SIGINT forces). An operator's rollout hangs until
    the orchestrator's SIGKILL. It should exit once the drain timeout (1 s here) has passed,
    at the latest on the second SIGTERM (15 s of patience after each)."""
    drained = settings.replace(drain_timeout_s=1.0)
    app = create_app(drained, runtime)
    services: Services = app.state.services
    options = uvicorn_options(drained)
    options["log_level"] = "warning"
    server = DrainingServer(uvicorn.Config(app, host="127.0.0.1", port=0, **options),
                            begin_drain=services.begin_drain,
                            active_calls=lambda: services.admission.active,
                            timeout_s=drained.drain_timeout_s)
    thread = threading.Thread(target=server.run, name="draining", daemon=True)
    thread.start()
    sock: socket.socket | None = None
    try:
        assert wait_for(lambda: server.started and services.ready, 120), "never ready"
        port = server.servers[0].sockets[0].getsockname()[1]
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(b"POST /twilio/voice HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/x-www-form-urlencoded\r\n"
                     b"Content-Length: 64\r\n\r\nCallSid=CA")
        # The request reached the app (its task runs, waiting for the rest of the body).
        assert wait_for(lambda: len(server.server_state.tasks) >= 1, 30)
        assert services.admission.active == 0  # no call at all: the drain ends at once

        server.handle_exit(signal.SIGTERM, None)  # what the signal handler calls
        exited_after_drain = wait_for(lambda: not thread.is_alive(), 15)
        if not exited_after_drain:
            server.handle_exit(signal.SIGTERM, None)  # the operator tries again
        exited = exited_after_drain or wait_for(lambda: not thread.is_alive(), 15)
        assert exited, ("the replica drained (no call left, drain_timeout_s=1) but was still "
                        "running 15 s after SIGTERM and 15 s after a second SIGTERM: uvicorn "
                        "waits forever for a request that never finishes; "
                        f"should_exit={server.should_exit} force_exit={server.force_exit} "
                        f"connections={len(server.server_state.connections)}")
    finally:
        if sock is not None:
            sock.close()
        if not wait_for(lambda: not thread.is_alive(), 10):
            server.force_exit = True
            thread.join(10)


class CountingReplica:
    """A stand-in replica that is ready and answers every other request 503, counting
    them: what the balancer forwards, and how often."""

    def __init__(self) -> None:
        seen = self.seen = []  # (method, path) of every request but the health checks

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self) -> None:
                if self.path == "/readyz":
                    status = 200
                else:
                    seen.append((self.command, self.path))
                    length = int(self.headers.get("content-length") or 0)
                    self.rfile.read(length)
                    status = 503
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            do_GET = do_POST = do_DELETE = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_the_balancer_resends_a_refused_get_but_never_an_admin_write(tmp_path: Path) -> None:
    """A replica's 503 is retried on another (a draining replica refuses an upgrade so),
    but only for a GET: a seed or an edit that one replica answered 503 (a Redis hiccup
    after it wrote, say) must not be published again by another."""
    if shutil.which("haproxy") is None:
        unavailable("haproxy is not installed (scripts/ensure-haproxy.sh)")
    replicas = [CountingReplica(), CountingReplica()]
    balancer = Balancer(tmp_path, [r.port for r in replicas])
    try:
        balancer.wait_up()

        def forwarded() -> list[tuple[str, str]]:
            return replicas[0].seen + replicas[1].seen

        seed = httpx.post(balancer.base_url + "/admin/seed", content=b"question,answer\n",
                          timeout=30)
        assert seed.status_code == 503
        assert forwarded() == [("POST", "/admin/seed")]

        edit = httpx.delete(balancer.base_url + "/admin/entries/hours", timeout=30)
        assert edit.status_code == 503
        assert forwarded().count(("DELETE", "/admin/entries/hours")) == 1

        upgrade = httpx.get(balancer.base_url + "/v1/call", timeout=30)
        assert upgrade.status_code == 503
        # Retried, and redispatched to the other replica.
        assert forwarded().count(("GET", "/v1/call")) > 1
        assert replicas[0].seen.count(("GET", "/v1/call")) >= 1
        assert replicas[1].seen.count(("GET", "/v1/call")) >= 1
    finally:
        balancer.stop()
        for replica in replicas:
            replica.close()



class HangingReplica:
    """A stand-in replica that is ready until ``hang`` is set; then it accepts connections
    and never answers (an event loop stuck, a process stopped): what a health check meets."""

    def __init__(self) -> None:
        self.hang = threading.Event()
        self.released = threading.Event()
        hang, released = self.hang, self.released

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if hang.is_set():
                    released.wait(120)  # never answers while the test runs
                    return
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("inter", ["1s", "5s"], ids=["as-shipped", "inter-raised-to-5s"])
def test_a_hung_replica_leaves_rotation_on_a_one_second_check(tmp_path: Path, inter: str) -> None:
    """A replica that hangs (accepts, never answers /readyz) is marked down by a check that
    times out after 1 s (`timeout check 1s`), also when an operator raises the check
    interval (fewer checks at many replicas): without `timeout check`, HAProxy bounds the
    whole check by `inter` instead, and a hung replica would take new calls for that long."""
    if shutil.which("haproxy") is None:
        unavailable("haproxy is not installed (scripts/ensure-haproxy.sh)")
    config = tmp_path / "haproxy.cfg"
    shipped = Balancer.CONFIG.read_text()
    assert "check inter 1s " in shipped
    config.write_text(shipped.replace("check inter 1s ", f"check inter {inter} "))
    replicas = [HangingReplica(), HangingReplica()]
    balancer = type("TunedBalancer", (Balancer,), {"CONFIG": config})(
        tmp_path, [r.port for r in replicas])
    try:
        balancer.wait_up()
        replicas[0].hang.set()
        down = "Server gateways/replica-1 is DOWN"
        assert wait_for(lambda: down in balancer.log.read_text(errors="replace"), 30), \
            balancer.log.read_text(errors="replace")[-3000:]
        line = next(l for l in balancer.log.read_text(errors="replace").splitlines() if down in l)
        # HAProxy's own measure of the failed check, not the test's wall clock; its loop
        # on a loaded machine can take the timeout late (1.1 s was too tight), but a check
        # bounded by `inter` (the failure: 5 s) is told apart.
        duration_ms = int(line.split("check duration: ")[1].split("ms")[0])
        assert "Layer7 timeout" in line and duration_ms < 2500, line
    finally:
        balancer.stop()
        for replica in replicas:
            replica.close()


@pytest.mark.slow
async def test_a_second_sigterm_exits_at_once_while_a_call_and_a_request_hang(
        redis_url: str, tmp_path: Path) -> None:
    """`voicegate serve` itself, real signals: a first SIGTERM drains, and the drain waits
    for the call (drain_timeout_s 600); a request whose body never completes would hold
    uvicorn's shutdown too. The operator's second SIGTERM must end the process at once
    (docs/operations.md), not after the drain, nor after uvicorn's wait for connections."""
    replica = Replica("hung", redis_url, tmp_path, {"VOICEGATE_DRAIN_TIMEOUT_S": "600",
                                                    "VOICEGATE_TURN_MODEL": "none",
                                                    "VOICEGATE_IDLE_PROMPT_S": "0"})
    caller: Caller | None = None
    sock: socket.socket | None = None
    try:
        replica.wait_ready()
        caller = Caller(replica.call_url)
        await caller.connect()  # a call that goes on: the drain waits for it
        sock = socket.create_connection(("127.0.0.1", replica.port), timeout=10)
        sock.sendall(b"POST /twilio/voice HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/x-www-form-urlencoded\r\n"
                     b"Content-Length: 64\r\n\r\nCallSid=CA")  # 10 of its 64 bytes, ever

        replica.process.send_signal(signal.SIGTERM)
        await wait_until(lambda: ready_status(replica) == 503, "the replica drains", timeout=30)
        body = replica.ready()
        assert body["draining"] is True and body["active_calls"] == 1
        assert replica.process.poll() is None  # the drain waits for the call

        replica.process.send_signal(signal.SIGTERM)  # the operator's patience ends
        try:
            code = await asyncio.to_thread(replica.process.wait, 20)
        except subprocess.TimeoutExpired:
            pytest.fail("a second SIGTERM did not end the draining replica within 20 s:\n"
                        + replica.log.read_text(errors="replace")[-3000:])
        log = replica.log.read_text(errors="replace")
        assert code == -signal.SIGTERM, log[-3000:]  # uvicorn re-raises the signal it took
        assert '"drain_finished"' not in log  # cut short, not run out
        # Forced: uvicorn did not wait for the call's connection or the request's.
        assert "Waiting for connections to close" not in log, log[-3000:]
    finally:
        if sock is not None:
            sock.close()
        if caller is not None:
            await caller.close()
        replica.stop()


# ---------------------------------------------------------------- docker compose

ROOT = Path(__file__).resolve().parents[1]


def _compose_balancer() -> tuple[dict[str, Any], dict[str, str], Path]:
    """docker-compose.yml's services, its balancer's environment and the HAProxy config
    it mounts (deploy/haproxy.cfg, the file tests/test_cluster.py runs on 127.0.0.1)."""
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    balancer = services["balancer"]
    mounted = next(v.split(":")[0] for v in balancer["volumes"]
                   if v.split(":")[1] == "/usr/local/etc/haproxy/haproxy.cfg")
    environment = {name: str(value) for name, value in balancer["environment"].items()}
    return services, environment, ROOT / mounted


def test_compose_brings_its_services_back_and_names_the_replicas_through_docker_dns() -> None:
    """Without a restart policy a replica that exits (a model that does not load ends
    `voicegate serve` with status 1, an OOM kill) or a Docker restart left the cluster
    down. And HAProxy resolved `gateway-1` once, at start-up: a replica container that
    came back under another IP was never reached again, and a replica not resolvable when
    HAProxy started kept HAProxy from starting at all."""
    services, environment, config = _compose_balancer()
    assert {name: service.get("restart") for name, service in services.items()} == {
        name: "unless-stopped" for name in ("redis", "gateway-1", "gateway-2", "balancer")}
    assert environment["VG_DNS"] == "127.0.0.11:53"  # Docker's embedded DNS
    if shutil.which("haproxy") is None:
        unavailable("haproxy is not installed (scripts/ensure-haproxy.sh)")
    # Valid as compose runs it, though gateway-1 and gateway-2 do not resolve here.
    done = subprocess.run(["haproxy", "-c", "-f", str(config)], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **environment})
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_keeps_the_replicas_model_cache_on_a_named_volume() -> None:
    """Review (stop 63): a replica keeps in its model cache dir (VOICEGATE_MODEL_CACHE_DIR)
    what it built at its first start: the embedder's and Moonshine's ONNX exports, the
    shipped negatives' vectors, and a version seeded by another embedder backend as
    re-embedded here (minutes for a 10k-question FAQ, /readyz 503 meanwhile). The image
    builds none of it (the Dockerfile sets no VOICEGATE_MODEL_CACHE_DIR and runs no export:
    ~/.cache/voicegate, in the container's own layer), and docker-compose.yml mounted no
    volume for it: every re-created container (an upgrade, --force-recreate) did it all again.

    Now every replica sets the dir and mounts one shared named volume there (writes are
    temp file + rename, temp names unique per writer: tests/test_reembedded_cache.py), at a
    path the image ships nothing in, so the volume hides nothing an upgrade would bring."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    replicas = {name: service for name, service in compose["services"].items()
                if name.startswith("gateway-")}
    assert sorted(replicas) == ["gateway-1", "gateway-2"]
    mounts = set()
    for name, service in replicas.items():
        path = str(service["environment"].get("VOICEGATE_MODEL_CACHE_DIR", ""))
        assert path.startswith("/"), f"{name}: no absolute VOICEGATE_MODEL_CACHE_DIR"
        volume = next((v.split(":")[0] for v in service.get("volumes", [])
                       if v.split(":")[1] == path), None)
        assert volume is not None, f"{name}: nothing mounted at {path}"
        assert ":ro" not in next(v for v in service["volumes"] if v.startswith(volume + ":"))
        mounts.add((volume, path))
    # One volume shared by the replicas (one host, one image, one CPU class: the same keys),
    # a named one (declared at the top level, not a bind mount of a host directory).
    (volume, path), = mounts
    assert volume in (compose.get("volumes") or {})
    # Not over the application (WORKDIR /app) nor anything the image builds: a named volume
    # is filled from the image only when first created, so an upgrade's files would be hidden.
    assert not (path == "/app" or path.startswith("/app/") or "/app".startswith(path + "/"))
    # No build step writes there (an ENV naming the same path would be harmless).
    steps = (ROOT / "Dockerfile").read_text(encoding="utf-8").replace("\\\n", " ").splitlines()
    building = [line for line in steps if line.split()[:1] in (["RUN"], ["COPY"], ["ADD"])]
    assert building and not [line for line in building
                             if path in line or "MODEL_CACHE_DIR" in line or ".cache" in line]


class NamedReplica:
    """A stand-in replica on one loopback address: ready, and says which it is."""

    def __init__(self, host: str, port: int, name: str) -> None:
        body = name.encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer((host, port), Handler)
        self.port = self.server.server_address[1]
        self.closed = False
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.server.shutdown()
            self.server.server_close()


def test_the_compose_balancer_follows_a_replica_to_its_new_address(tmp_path: Path) -> None:
    """deploy/haproxy.cfg as docker-compose.yml runs it, its DNS a fake of Docker's: the
    replicas' names resolve to 127.0.0.2, then (their containers restarted) to 127.0.0.3.
    Traffic must follow, without restarting HAProxy."""
    if shutil.which("haproxy") is None:
        unavailable("haproxy is not installed (scripts/ensure-haproxy.sh)")
    _, environment, config = _compose_balancer()
    old = NamedReplica("127.0.0.2", 0, "old")
    new = NamedReplica("127.0.0.3", old.port, "new")  # the same port, another address
    dns = FakeDNS({"gateway-1": "127.0.0.2", "gateway-2": "127.0.0.2"})
    lb = f"http://127.0.0.1:{free_port()}"
    env = {**os.environ, **environment, "VG_LB_BIND": lb.removeprefix("http://"),
           "VG_DNS": dns.address}
    for name in ("VG_REPLICA_1", "VG_REPLICA_2"):  # gateway-n:8080, on the replicas' port
        env[name] = environment[name].rsplit(":", 1)[0] + f":{old.port}"
    log = tmp_path / "haproxy.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(["haproxy", "-db", "-f", str(config)], env=env,
                                   stdout=out, stderr=subprocess.STDOUT)

    def answered_by(name: str) -> bool:
        if process.poll() is not None:
            pytest.fail(f"haproxy exited: {log.read_text(errors='replace')[-3000:]}")
        try:
            return httpx.get(lb + "/who", timeout=5).text == name
        except httpx.HTTPError:
            return False

    def wait_for(name: str, what: str) -> None:
        deadline = time.monotonic() + 60
        while not answered_by(name):
            if time.monotonic() > deadline:
                pytest.fail(f"{what}: {log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.1)

    try:
        wait_for("old", "the balancer never reached the replicas by name")
        dns.names = {"gateway-1": "127.0.0.3", "gateway-2": "127.0.0.3"}
        old.close()  # the old containers are gone
        wait_for("new", "the balancer kept the replicas' old address")
        assert all(answered_by("new") for _ in range(5))
        assert "changed its IP from 127.0.0.2 to 127.0.0.3" in log.read_text(errors="replace")
    finally:
        process.terminate()
        process.wait(timeout=10)
        dns.close()
        old.close()
        new.close()
