"""One TCP connection speaking HTTP/1.1 by hand: what the hostile tests need
and no client library lets them do (trickle, pipeline, omit Host, ...)."""

from __future__ import annotations

import socket


class Raw:
    """One TCP connection to ``url`` (``http://host:port``)."""

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buf += data
        return bool(data)

    def response(self, head: bool = False) -> tuple[int, dict[bytes, bytes], bytes]:
        """The next answer: ``(status, headers, body)``; the body is framed by
        content-length (``head``: no body) or chunked."""
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                raise ConnectionError(f"closed before an answer; got {self.buf!r}")
        raw_head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        status_line, *lines = raw_head.split(b"\r\n")
        headers: dict[bytes, bytes] = {}
        for line in lines:
            name, value = line.split(b":", 1)
            headers[name.strip().lower()] = value.strip()
        status = int(status_line.split()[1])
        if head or status in (204, 304) or 100 <= status < 200:
            return status, headers, b""
        if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            return status, headers, self._chunked()
        length = int(headers.get(b"content-length", b"0"))
        while len(self.buf) < length:
            if not self._fill():
                raise ConnectionError("closed inside a body")
        body, self.buf = self.buf[:length], self.buf[length:]
        return status, headers, body

    def _chunked(self) -> bytes:
        out = b""
        while True:
            while b"\r\n" not in self.buf:
                if not self._fill():
                    raise ConnectionError("closed inside a chunked body")
            size_line, rest = self.buf.split(b"\r\n", 1)
            size = int(size_line.split(b";")[0], 16)
            while len(rest) < size + 2:
                if not self._fill():
                    raise ConnectionError("closed inside a chunk")
                rest = self.buf.split(b"\r\n", 1)[1]
            if size == 0:
                self.buf = rest[2:]
                return out
            out += rest[:size]
            self.buf = rest[size + 2 :]

    def closed_by_server(self, timeout: float = 5.0) -> bool:
        """True once the server closed the connection (nothing more to read)."""
        self.sock.settimeout(timeout)
        try:
            while self._fill():
                pass
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
        return True

    def close(self) -> None:
        self.sock.close()


def request(method: str, path: str, body: bytes | None = None, *extra: str) -> bytes:
    """The bytes of one HTTP/1.1 request with ``Host`` (plus ``extra`` header lines)."""
    lines = [f"{method} {path} HTTP/1.1", "Host: test", *extra]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")
