"""A misbehaving network between a client and Redis, for the Redis failure tests."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.test_redis import OwnRedis, free_port


class _Link:
    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.dead = False  # a silently dead path: bytes are lost both ways, no RST, no FIN


class FlakyProxy:
    """A TCP proxy in front of Redis that can misbehave like a network:

    - ``kill_existing_silently()``: every open connection becomes a black hole (what a
      failover, a NAT/LB reset or a vanished host looks like to a client: no RST, no FIN);
      new connections work.
    - ``close_existing()``: every open connection is closed (what a Redis restart, a
      failover or its idle ``timeout`` does to its clients); new connections work.
    - ``stall()`` / ``resume()``: nothing gets through, either way, until ``resume()``; then
      everything held is delivered in order (a Redis that stops answering for a while, e.g.
      stuck behind a slow command or a fork, and then works off its queue).
    """

    def __init__(self, upstream_url: str) -> None:
        parts = redis.connection.parse_url(upstream_url)
        self.upstream = (parts.get("host", "127.0.0.1"), int(parts.get("port", 6379)))
        self.db = int(parts.get("db", 0))
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/{self.db}"
        self._flowing = threading.Event()
        self._flowing.set()
        self._links: list[_Link] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            link = _Link(client, upstream)
            with self._lock:
                self._links.append(link)
            threading.Thread(target=self._pump, args=(link, client, upstream, False),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(link, upstream, client, True),
                             daemon=True).start()

    def _pump(self, link: _Link, source: socket.socket, target: socket.socket,
              is_reply: bool) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if link.dead:
                    continue  # lost on the way
                self._flowing.wait()
                if link.dead:
                    continue
                target.sendall(data)
        except OSError:
            pass
        finally:
            if not link.dead:
                for s in (source, target):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

    def stall(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def close_existing(self) -> None:
        """Close every open connection (FIN both ways), as a Redis restart, a failover or
        Redis's idle ``timeout`` closes its clients' connections; new ones work."""
        with self._lock:
            links = list(self._links)
        for link in links:
            for s in (link.client, link.upstream):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def kill_existing_silently(self) -> None:
        with self._lock:
            for link in self._links:
                link.dead = True

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        with self._lock:
            for link in self._links:
                for s in (link.client, link.upstream):
                    try:
                        s.close()
                    except OSError:
                        pass


class _HeldLink:
    def __init__(self, client: socket.socket, upstream: socket.socket, flowing: bool) -> None:
        self.client = client
        self.upstream = upstream
        self.gate = threading.Event()  # client -> Redis bytes pass only while set
        if flowing:
            self.gate.set()
        self.replied = threading.Event()  # Redis answered something after the gate opened


class DelayingProxy:
    """``hold()``: bytes clients send on the connections open now, and on those opened until
    ``admit_new()``, are held back (in order, per connection), even once the client has given
    up and closed; ``release()`` delivers them, as a delayed TCP segment is delivered."""

    def __init__(self, upstream_url: str) -> None:
        parts = redis.connection.parse_url(upstream_url)
        self.upstream = (parts.get("host", "127.0.0.1"), int(parts.get("port", 6379)))
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/{int(parts.get('db', 0))}"
        self._holding_new = False
        self._lock = threading.Lock()
        self.links: list[_HeldLink] = []
        self.held: list[_HeldLink] = []
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            with self._lock:
                link = _HeldLink(client, upstream, flowing=not self._holding_new)
                self.links.append(link)
                if self._holding_new:
                    self.held.append(link)
            threading.Thread(target=self._up, args=(link,), daemon=True).start()
            threading.Thread(target=self._down, args=(link,), daemon=True).start()

    def _up(self, link: _HeldLink) -> None:
        try:
            while True:
                data = link.client.recv(65536)
                if not data:
                    break
                link.gate.wait()
                link.upstream.sendall(data)
        except OSError:
            pass
        link.gate.wait()
        try:
            link.upstream.shutdown(socket.SHUT_WR)  # FIN after the data, as TCP orders it
        except OSError:
            pass

    def _down(self, link: _HeldLink) -> None:
        try:
            while True:
                data = link.upstream.recv(65536)
                if link.gate.is_set():
                    link.replied.set()
                if not data:
                    break
                link.client.sendall(data)
        except OSError:
            link.replied.set()

    def hold(self) -> None:
        with self._lock:
            self._holding_new = True
            for link in self.links:
                if link.gate.is_set():
                    link.gate.clear()
                    self.held.append(link)

    def admit_new(self) -> None:
        with self._lock:
            self._holding_new = False

    def release(self) -> None:
        with self._lock:
            for link in self.held:
                link.gate.set()

    def close(self) -> None:
        self._listener.close()
        self.release()
        with self._lock:
            for link in self.links:
                for s in (link.client, link.upstream):
                    try:
                        s.close()
                    except OSError:
                        pass


def _direct(url: str) -> redis.Redis:
    """A client that retries nothing: a helper sees what Redis answers."""
    return redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=30,
                                retry=Retry(NoBackoff(), 0))


class StartingRedis(OwnRedis):
    """A redis-server of the test's own (RDB persistence) that ``restart_loading()`` restarts
    into a real LOADING state that lasts until ``finish_loading()``: Redis's own
    ``key-load-delay`` (a delay per key loaded, microseconds) slows the load of a dataset
    padded with ``filler`` random keys, each larger than ``loading-process-events-interval-
    bytes``, so Redis answers its clients (``-LOADING``, or SUBSCRIBE, CONFIG, which it serves
    while loading) after every key. ``finish_loading`` sets the delay to 0 (CONFIG is served
    while loading) and waits until Redis serves reads: no clock decides when it ends."""

    FILLER = 2000
    KEY_DELAY_US = 200_000  # 0.2 s a key: 400 s of loading unless finished
    PERSISTENCE = ("--appendonly", "no", "--save", "", "--dbfilename", "dump.rdb")

    def restart_loading(self) -> None:
        client = _direct(self.url)
        pipe = client.pipeline(transaction=False)
        for i in range(self.FILLER):
            pipe.set(f"filler:{i}", os.urandom(1100))
        pipe.execute()
        client.save()
        client.close()
        self.stop()
        self.launch(*self.PERSISTENCE, "--key-load-delay", str(self.KEY_DELAY_US),
                    "--loading-process-events-interval-bytes", "1024")
        client = _direct(self.url)
        deadline = time.monotonic() + 30
        try:
            while True:
                try:
                    client.get("filler:0")
                    raise RuntimeError("redis-server loaded its dataset at once")
                except redis.BusyLoadingError:
                    return
                except redis.ConnectionError:
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"redis-server did not start: see "
                                           f"{self.dir}/redis.log")
                time.sleep(0.05)
        finally:
            client.close()

    def finish_loading(self) -> None:
        client = _direct(self.url)
        try:
            client.config_set("key-load-delay", 0)
            while True:
                try:
                    client.ping()
                    return
                except redis.BusyLoadingError:
                    time.sleep(0.05)
        finally:
            client.close()


class MisconfRedis(OwnRedis):
    """A redis-server of the test's own that ``refuse_writes()`` makes refuse every write
    with ``-MISCONF`` as a full or broken disk does: its RDB file name is a directory, so
    BGSAVE cannot rename its snapshot into place and fails, and with a save point and
    ``stop-writes-on-bgsave-error yes`` (the default) Redis refuses writes until a BGSAVE
    succeeds. ``heal()`` removes the directory and saves again."""

    PERSISTENCE = ("--appendonly", "no", "--save", "3600 1", "--dbfilename", "snapshot.rdb",
                   "--stop-writes-on-bgsave-error", "yes", "--shutdown-on-sigterm", "nosave")

    def start(self) -> None:
        self.blocker = self.dir / "snapshot.rdb"
        super().start()

    def _bgsave(self, want: str) -> None:
        client = _direct(self.url)
        try:
            while client.info("persistence")["rdb_bgsave_in_progress"]:
                time.sleep(0.05)
            client.bgsave()
            while True:
                info = client.info("persistence")
                if not info["rdb_bgsave_in_progress"] and \
                        info["rdb_last_bgsave_status"] == want:
                    return
                time.sleep(0.05)
        finally:
            client.close()

    def refuse_writes(self) -> None:
        Path(self.blocker).mkdir()
        self._bgsave("err")

    def heal(self) -> None:
        Path(self.blocker).rmdir()
        self._bgsave("ok")


class ReadRefusingRedis(OwnRedis):
    """A redis-server of the test's own that ``refuse(how)`` makes refuse every read for now,
    as a production Redis does, until ``serve()``:

    - ``"busy"``: a Lua script that never ends runs; past ``busy-reply-threshold`` (set low
      here) Redis answers every other command ``-BUSY``, until SCRIPT KILL stops the script
      (it wrote nothing, so it may be killed). The threshold is set by its older name,
      ``lua-time-limit``, which Redis 6 (Ubuntu 22.04's apt package) knows too.
    - ``"masterdown"``: Redis is made a replica of a primary that is not there, with
      ``replica-serve-stale-data no``: it answers reads ``-MASTERDOWN`` until ``REPLICAOF NO
      ONE`` (its data is kept: no sync ever began)."""

    PERSISTENCE = OwnRedis.PERSISTENCE + ("--lua-time-limit", "50")

    def refuse(self, how: str) -> None:
        self._how = how
        client = _direct(self.url)
        try:
            if how == "busy":
                self._script = threading.Thread(target=self._run_forever, daemon=True)
                self._script.start()
            else:
                client.config_set("replica-serve-stale-data", "no")
                client.replicaof("127.0.0.1", free_port())
            while True:  # until a read meets the refusal
                try:
                    client.get("refusing:probe")
                except redis.ResponseError as exc:
                    if str(exc).startswith("BUSY") or \
                            isinstance(exc, redis.exceptions.MasterDownError):
                        return
                    raise
                time.sleep(0.01)
        finally:
            client.close()

    def _run_forever(self) -> None:
        client = _direct(self.url)
        try:
            client.eval("while true do end", 0)
        except redis.ResponseError:
            pass  # SCRIPT KILL ended it
        finally:
            client.close()

    def serve(self) -> None:
        client = _direct(self.url)
        try:
            if self._how == "busy":
                client.script_kill()
                self._script.join(30)
            else:
                client.replicaof("NO", "ONE")
            client.get("refusing:probe")  # served again
        finally:
            client.close()
