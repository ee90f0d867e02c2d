"""A DNS server on 127.0.0.1 (UDP) that answers A queries from a table the test changes:
what Docker's embedded DNS (127.0.0.11) does for a compose network, where a restarted
container's name comes back with another IP."""

from __future__ import annotations

import socket
import struct
import threading

_A, _IN = 1, 1
_NXDOMAIN = 3


class FakeDNS:
    """``FakeDNS({"gateway-1": "127.0.0.2"})``; ``names`` may be changed at any time. A name
    not in the table is NXDOMAIN; another query type for a known name, no answer."""

    def __init__(self, names: dict[str, str]) -> None:
        self.names = dict(names)
        self.queries = 0
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.2)  # so close() ends the thread soon
        self._closed = False
        self.port: int = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True, name="fake-dns")
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while not self._closed:
            try:
                query, client = self._sock.recvfrom(4096)
            except socket.timeout:
                continue
            except OSError:  # closed
                return
            try:
                self._sock.sendto(self._answer(query), client)
            except (OSError, ValueError, IndexError, struct.error):
                pass  # not a query this fake understands: no answer

    def _answer(self, query: bytes) -> bytes:
        ident, _flags, qdcount = struct.unpack("!HHH", query[:6])
        if qdcount != 1:
            raise ValueError("one question per query")
        labels, at = [], 12
        while query[at]:
            length = query[at]
            labels.append(query[at + 1:at + 1 + length].decode("ascii").lower())
            at += 1 + length
        qtype, qclass = struct.unpack("!HH", query[at + 1:at + 5])
        question = query[12:at + 5]
        self.queries += 1
        address = self.names.get(".".join(labels))
        answers = b""
        if address is not None and (qtype, qclass) == (_A, _IN):
            answers = (b"\xc0\x0c" + struct.pack("!HHIH", _A, _IN, 1, 4)
                       + socket.inet_aton(address))  # TTL 1 s
        rcode = _NXDOMAIN if address is None else 0
        flags = 0x8000 | 0x0400 | 0x0100 | 0x0080 | rcode  # response, authoritative, RD, RA
        header = struct.pack("!HHHHHH", ident, flags, 1, 1 if answers else 0, 0, 0)
        return header + question + answers

    def close(self) -> None:
        self._closed = True
        self._thread.join(timeout=5)
        self._sock.close()
