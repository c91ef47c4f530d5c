"""A small asyncio HTTP/1.1 client for ``lmloop replay``: keep-alive connections to one server, at most
N requests in flight, JSON in and out, without a third-party client (httpx is a dev dependency only)."""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

from lmloop.errors import ConfigError


class HttpError(Exception):
    """No HTTP answer: refused, reset, timed out. ``kind`` is what the summary counts it as."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass
class Endpoint:
    host: str
    port: int
    tls: bool
    prefix: str  # a path before /v1/... (a server behind a proxy at http://h/lmloop)

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        u = urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ConfigError(f"--url {url!r}: expected http://HOST[:PORT] or https://HOST[:PORT]")
        try:
            port = u.port or (443 if u.scheme == "https" else 80)
        except ValueError:
            raise ConfigError(f"--url {url!r}: the port is not a number") from None
        return cls(u.hostname, port, u.scheme == "https", u.path.rstrip("/"))


class Pool:
    """Keep-alive HTTP/1.1 connections to one server, at most ``size`` requests in flight."""

    def __init__(self, ep: Endpoint, size: int, timeout: float, headers: dict[str, str]):
        self.ep, self.timeout = ep, timeout
        self.slots = asyncio.Semaphore(size)
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        host = ep.host if ":" not in ep.host else f"[{ep.host}]"
        default = ep.port == (443 if ep.tls else 80)
        self.head = f"Host: {host}{'' if default else f':{ep.port}'}\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in headers.items()
        )

    async def request(
        self, method: str, path: str, body: bytes = b"", headers: dict | None = None, on_send=None
    ) -> tuple[int, bytes]:
        """(status, body). ``on_send()`` is called when a connection is free and the request goes out."""
        async with self.slots:
            if on_send:
                on_send()
            extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
            msg = (
                f"{method} {self.ep.prefix}{path} HTTP/1.1\r\n{self.head}{extra}"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode("latin-1") + body
            try:
                return await asyncio.wait_for(self._exchange(msg), self.timeout)
            except asyncio.TimeoutError:
                raise HttpError("timeout", f"no answer within {self.timeout:g} s") from None

    async def _exchange(self, msg: bytes) -> tuple[int, bytes]:
        while self.idle:  # a reused connection the server closed while idle fails before any answer
            conn = self.idle.pop()
            try:
                return await self._on(conn, msg)
            except Stale:
                continue
        try:
            conn = await asyncio.open_connection(
                self.ep.host, self.ep.port, ssl=ssl.create_default_context() if self.ep.tls else None
            )
        except OSError as e:
            kind = "refused" if isinstance(e, ConnectionRefusedError) else "connect"
            raise HttpError(kind, f"cannot connect to {self.ep.host}:{self.ep.port}: {e}") from None
        try:
            return await self._on(conn, msg)
        except Stale:
            raise HttpError("closed", "the server closed the connection without answering") from None

    async def _on(self, conn, msg: bytes) -> tuple[int, bytes]:
        reader, writer = conn
        keep = False
        try:
            try:
                writer.write(msg)
                await writer.drain()
                line = await reader.readline()
            except (ConnectionError, OSError):
                raise Stale() from None
            if not line:
                raise Stale()
            try:
                status = int(line.split()[1])
            except (IndexError, ValueError):
                raise HttpError("protocol", f"not an HTTP answer: {line[:80]!r}") from None
            length, chunked, close = None, False, line.startswith(b"HTTP/1.0")
            while True:
                h = await reader.readline()
                if h in (b"\r\n", b"\n", b""):
                    break
                k, _, v = h.decode("latin-1").partition(":")
                k, v = k.strip().lower(), v.strip().lower()
                if k == "content-length":
                    length = int(v)
                elif k == "transfer-encoding":
                    chunked = "chunked" in v
                elif k == "connection":
                    close = close or v == "close"
            if chunked:
                parts = []
                while True:
                    size = int((await reader.readline()).split(b";")[0], 16)
                    if size == 0:
                        while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                            pass  # trailers
                        break
                    parts.append(await reader.readexactly(size))
                    await reader.readexactly(2)
                body = b"".join(parts)
            elif length is not None:
                body = await reader.readexactly(length)
            else:
                body, close = await reader.read(), True
            keep = not close
            return status, body
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as e:
            raise HttpError("reset", f"connection lost mid-answer: {e}") from None
        except ValueError as e:  # a Content-Length or chunk size that is not a number
            raise HttpError("protocol", f"malformed HTTP answer: {e}") from None
        finally:
            if keep:
                self.idle.append(conn)
            else:
                writer.close()

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


class Stale(Exception):
    pass
