"""A raw HTTP/1.1 POST that streams its body and stops as soon as the server answers.

Ordinary clients (httpx included) write the whole body before they look for a response, so they
cannot show *when* a server answered or how much of the body it took first. This one writes
the body piece by piece on a non-blocking socket and reads whenever the server has something to
say: `sent` is how many body bytes (framing included) went out before the answer arrived, which
is bounded by the socket buffers once the server stops reading.
"""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit


@dataclass
class Answer:
    status: int  # 0: no answer before the connection ended or the time ran out
    headers: dict[str, str]
    body: bytes
    sent: int

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


def repeated(piece: bytes, total: int) -> Iterator[bytes]:
    """`total` bytes as `piece`-sized chunks (the last one shorter), without building them all."""
    whole, rest = divmod(total, len(piece))
    for _ in range(whole):
        yield piece
    if rest:
        yield piece[:rest]


def _framed(chunks: Iterable[bytes], chunked: bool) -> Iterator[bytes]:
    for chunk in chunks:
        if chunk:
            yield b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk
    if chunked:
        yield b"0\r\n\r\n"


def _parse(raw: bytes, sent: int) -> Answer:
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        return Answer(0, {}, b"", sent)
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Answer(int(status_line.split(" ")[1]), headers, body, sent)


def _complete(raw: bytes) -> bool:
    answer = _parse(raw, 0)
    length = answer.headers.get("content-length")
    return answer.status != 0 and length is not None and len(answer.body) >= int(length)


def post(
    base_url: str,
    path: str,
    chunks: Iterable[bytes],
    *,
    headers: dict[str, str] | None = None,
    content_length: int | None = None,
    timeout: float = 60.0,
) -> Answer:
    """POST `chunks`: chunked transfer encoding, or as-is under `content_length` when given
    (which may announce more than is sent, to see whether the server waits for it)."""
    url = urlsplit(base_url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    chunked = content_length is None
    lines.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {content_length}")
    deadline = time.monotonic() + timeout
    raw, sent, pending = b"", 0, b""
    frames = _framed(chunks, chunked)
    writing = True
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        sock.setblocking(False)
        while time.monotonic() < deadline:
            readable, writable, _ = select.select([sock], [sock] if writing else [], [], 0.2)
            if readable:
                try:
                    data = sock.recv(65536)
                except ConnectionResetError:
                    break
                if not data:
                    break
                raw += data
                if _complete(raw):
                    break
                writing = False  # the server has answered: the rest of the body is moot
                continue
            if writable:
                if not pending:
                    pending = next(frames, b"")
                    if not pending:
                        writing = False
                        continue
                try:
                    n = sock.send(pending)
                except (BrokenPipeError, ConnectionResetError):
                    writing = False
                    continue
                pending, sent = pending[n:], sent + n
    return _parse(raw, sent)
