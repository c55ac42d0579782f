"""Egress: a sandbox's only way out, through an allowlisting proxy on the trusted side.

A sandbox has its own network namespace (only `lo`) and may not create AF_UNIX
sockets. Where its tenant's policy grants `host:port` pairs (`TenantPolicy.egress`),
tenant code uses an HTTP proxy at 127.0.0.1:<port> (`proxy_env`), served by:
- `start_forwarder(side, port)`, in the sandbox (stdlib only): per accepted
  connection it asks for a tunnel over `side`, the AF_UNIX socket handed over at
  spawn, gets one socket back by SCM_RIGHTS and relays bytes between the two.
- `EgressProxy`, trusted: `attach(side, tenant)` serves one sandbox's side channel.
  A tunnel is one end of a fresh socketpair; on the other the proxy reads one
  request (`CONNECT host:port`, or plain HTTP with an absolute URI), checks it
  against the allowlist, resolves the name itself, refuses non-public addresses
  unless the entry names that IP or `localhost`, connects to an address it
  checked, and relays. Refusals are HTTP answers: 400, 403 (logged), 408, 429, 502.
Side channel: JSON lines. Sandbox: `{"op": "open"}`; proxy: `{"ok": true}` with one
fd, or `{"ok": false, "status": 429, "error": ...}`. Fds from the sandbox are closed unread.
"""

from __future__ import annotations

import array
import http
import ipaddress
import json
import logging
import os
import select
import socket
import threading
import time
from contextlib import suppress
from typing import Sequence
from urllib.parse import urlsplit

log = logging.getLogger("dynwf_ray.egress")

_HEAD_MAX = 8192  # bytes of one request head
_HEAD_TIMEOUT = 10.0  # seconds to receive it
_LINE_MAX = 4096  # bytes of one side-channel line
_HOP = {b"connection", b"keep-alive", b"proxy-connection", b"proxy-authorization"}


def proxy_env(port: int) -> dict[str, str]:
    """Environment that points HTTP clients in the sandbox at the forwarder."""
    env = {"HTTPS_PROXY": f"http://127.0.0.1:{port}", "HTTP_PROXY": f"http://127.0.0.1:{port}", "NO_PROXY": ""}
    return env | {k.lower(): v for k, v in env.items()}  # curl reads only the lowercase http_proxy


class _Refused(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def _response(status: int, text: str) -> bytes:
    body = (text + "\n").encode()
    return (f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\nContent-Type: text/plain; charset=utf-8"
            f"\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


def _recv(sock: socket.socket, maxfds: int) -> tuple[bytes, list[int]]:
    """One recvmsg: the data and the fds that came with it (close-on-exec; extra fds are dropped)."""
    data, anc, _, _ = sock.recvmsg(_LINE_MAX, socket.CMSG_SPACE(maxfds * 4), socket.MSG_CMSG_CLOEXEC)
    fds = array.array("i")
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % 4])
    return data, list(fds)


def _read_head(sock: socket.socket, timeout: float) -> tuple[bytes, bytes]:
    """(request head, bytes read after it); _Refused if too long, cut short or slow."""
    buf, deadline = b"", time.monotonic() + timeout
    while b"\r\n\r\n" not in buf:
        if len(buf) >= _HEAD_MAX + 4:
            raise _Refused(400, f"request head over {_HEAD_MAX} bytes")
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        try:
            chunk = sock.recv(_HEAD_MAX + 4 - len(buf))
        except TimeoutError:
            raise _Refused(408, f"no complete request head within {timeout:g} s") from None
        if not chunk:
            raise _Refused(400, "connection closed before the end of the request head")
        buf += chunk
    sock.settimeout(None)
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


def _relay(x: socket.socket, y: socket.socket) -> None:
    """Copy bytes both ways, passing half-closes on, until both directions end or one fails; close both."""
    peer, out, reading = {x: y, y: x}, {x: b"", y: b""}, {x, y}  # out[s]: bytes owed to s
    try:
        x.setblocking(False)
        y.setblocking(False)
        while reading or out[x] or out[y]:
            poll, masks = select.poll(), {}
            for s in (x, y):  # read s only once its last bytes are passed on (backpressure)
                mask = (select.POLLIN if s in reading and not out[peer[s]] else 0) | (select.POLLOUT if out[s] else 0)
                if mask or s not in reading:  # a socket done reading is watched for hangup only
                    poll.register(s, mask)
                    masks[s.fileno()] = (s, mask)
            for fd, ev in poll.poll():
                s, mask = masks[fd]
                if not mask:
                    return  # hung up: nothing more to read from it or to write to it
                if mask & select.POLLOUT and ev & (select.POLLOUT | select.POLLHUP | select.POLLERR):
                    out[s] = out[s][s.send(out[s]):]
                if mask & select.POLLIN and ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
                    if data := s.recv(65536):
                        out[peer[s]] = data
                    else:  # nothing is owed to peer[s] (else s was not read): pass the EOF on
                        reading.discard(s)
                        peer[s].shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        x.close()
        y.close()


# --- sandbox side ---------------------------------------------------------------------


def start_forwarder(side: socket.socket, port: int) -> int:
    """Listen on 127.0.0.1:`port`, tunnel each connection through `side`; returns the port bound."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(64)
    lock = threading.Lock()  # one open request and its reply on `side` at a time

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:  # e.g. out of fds: back off, keep serving
                time.sleep(0.05)
                continue
            try:
                threading.Thread(target=_forward, args=(conn, side, lock), daemon=True).start()
            except RuntimeError:  # out of threads
                conn.close()

    threading.Thread(target=accept, name="dynwf-egress-forwarder", daemon=True).start()
    return listener.getsockname()[1]


def _forward(conn: socket.socket, side: socket.socket, lock: threading.Lock) -> None:
    data, fds, reply = b"", [], {}
    try:
        with lock:
            side.sendall(b'{"op": "open"}\n')
            while not data.endswith(b"\n") and len(data) < _LINE_MAX:
                chunk, more = _recv(side, 1)
                data, fds = data + chunk, fds + more
                if not chunk:
                    break
        reply = json.loads(data)
    except (OSError, ValueError):
        pass
    tunnel = socket.socket(fileno=fds.pop(0)) if fds else None
    for fd in fds:
        os.close(fd)
    reply = reply if isinstance(reply, dict) else {}
    if reply.get("ok") is True and tunnel:
        return _relay(conn, tunnel)
    if tunnel:
        tunnel.close()
    with suppress(OSError, _Refused):
        _read_head(conn, 2.0)  # let the client send its request before the answer
    with suppress(OSError):
        status = reply.get("status") if reply.get("status") in (400, 429) else 502
        conn.sendall(_response(status, str(reply.get("error", "egress channel closed"))))
    conn.close()


# --- trusted side ---------------------------------------------------------------------


class EgressProxy:
    """Serves sandboxes' side channels; every tunnel's target is checked against `allow`."""

    def __init__(self, allow: Sequence[str], *, resolve=socket.getaddrinfo,
                 connect_timeout: float = 10.0, max_tunnels: int = 16):
        self._allow: list[tuple[str, int, bool]] = []  # (host, or ".suffix" for "*.suffix"; port; explicit)
        for entry in allow:
            host, _, port = entry.lower().rpartition(":")
            host = host.strip("[]").rstrip(".")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"egress entry {entry!r} must be 'host:port'")
            explicit = host == "localhost" or _ip(host) is not None  # may be a loopback/private address
            self._allow.append((host[1:] if host.startswith("*.") else host, int(port), explicit))
        self._resolve, self._timeout, self._max = resolve, connect_timeout, max_tunnels
        self._lock, self._live, self._closed = threading.Lock(), set(), False

    def attach(self, side: socket.socket, tenant: str) -> None:
        """Serve one sandbox's side channel (the trusted end of its socketpair) on a daemon thread."""
        with self._lock:
            if self._closed:
                raise RuntimeError("EgressProxy is closed")
            self._live.add(side)
        threading.Thread(target=self._channel, args=(side, tenant), name=f"dynwf-egress-{tenant}",
                         daemon=True).start()

    def close(self) -> None:
        """End every side channel and tunnel (their threads then exit)."""
        with self._lock:
            self._closed, live = True, list(self._live)
        for s in live:
            with suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def _channel(self, side: socket.socket, tenant: str) -> None:
        buf, tunnels = b"", [0]  # tunnels[0]: this sandbox's open tunnels
        try:
            while len(buf) <= _LINE_MAX:
                data, fds = _recv(side, 8)
                for fd in fds:  # never trust fds from the sandbox
                    os.close(fd)
                if not data:
                    break
                *lines, buf = (buf + data).split(b"\n")
                for line in lines:
                    self._open(side, tenant, line, tunnels)
        except OSError:
            pass
        finally:
            self._end(None, side)

    def _open(self, side: socket.socket, tenant: str, line: bytes, tunnels: list[int]) -> None:
        try:
            ok = json.loads(line).get("op") == "open"
        except (ValueError, AttributeError):
            ok = False
        with self._lock:
            full = ok and (tunnels[0] >= self._max or self._closed)
            tunnels[0] += ok and not full
        if ok and not full:
            return self._tunnel(side, tenant, tunnels)
        reply = {"ok": False, "status": 400, "error": "bad side-channel request"}
        if full:
            log.warning("egress refused for tenant %s: over %d open tunnels", tenant, self._max)
            reply = {"ok": False, "status": 429, "error": f"over {self._max} open egress tunnels"}
        side.sendall(json.dumps(reply).encode() + b"\n")

    def _tunnel(self, side: socket.socket, tenant: str, tunnels: list[int]) -> None:
        a, b = socket.socketpair()
        with self._lock:
            self._live.add(a)
        try:
            threading.Thread(target=self._serve, args=(a, tenant, tunnels), daemon=True).start()
        except RuntimeError:  # out of threads: the sandbox sees its tunnel close
            self._end(tunnels, a)
        try:
            socket.send_fds(side, [b'{"ok": true}\n'], [b.fileno()])
        finally:
            b.close()

    def _end(self, tunnels: list[int] | None, *socks: socket.socket | None) -> None:
        with self._lock:
            self._live.difference_update(socks)
            if tunnels is not None:
                tunnels[0] -= 1
        for s in socks:
            if s is not None:
                s.close()

    def _serve(self, a: socket.socket, tenant: str, tunnels: list[int]) -> None:
        up, target = None, "?"
        try:
            head, rest = _read_head(a, _HEAD_TIMEOUT)
            method, host, port, first = _parse(head)
            target = f"{host}:{port}"
            up = self._connect(host, port)
            with self._lock:
                self._live.add(up)
            if method == "CONNECT":
                a.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            up.sendall(first + rest)
            _relay(a, up)
        except _Refused as r:
            if r.status == 403:
                log.warning("egress denied for tenant %s to %s: %s", tenant, target, r.reason)
            with suppress(OSError):
                a.sendall(_response(r.status, r.reason))
        except OSError:
            pass
        finally:
            self._end(tunnels, a, up)

    def _connect(self, host: str, port: int) -> socket.socket:
        entry = next((e for e in self._allow if e[1] == port and (
            host == e[0] or e[0].startswith(".") and host.endswith(e[0]))), None)
        if entry is None:
            raise _Refused(403, f"{host}:{port} is not in this tenant's egress allowlist")
        try:
            addrs = self._resolve(host, port, 0, socket.SOCK_STREAM)
        except OSError as e:
            raise _Refused(502, f"cannot resolve {host}: {e}") from None
        addrs = [ai for ai in addrs if entry[2] or _public(_ip(ai[4][0]))]
        if not addrs:
            raise _Refused(403, f"{host} resolves to a non-public address (allow its IP explicitly)")
        for family, kind, proto, _, addr in addrs[:4]:
            s = socket.socket(family, kind, proto)
            try:
                s.settimeout(self._timeout)
                s.connect(addr)
                s.settimeout(None)
                return s
            except OSError as e:
                s.close()
                error = e
        raise _Refused(502, f"cannot connect to {host}:{port}: {error}")


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    with suppress(ValueError):
        return ipaddress.ip_address(text.strip("[]").split("%", 1)[0])
    return None


def _public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> bool:
    """Globally routable unicast: not loopback, private, link-local, multicast, unspecified, reserved."""
    ip = getattr(ip, "ipv4_mapped", None) or ip
    return ip is not None and ip.is_global and not (ip.is_multicast or ip.is_reserved)


def _parse(head: bytes) -> tuple[str, str, int, bytes]:
    """(method, host, port, head to send upstream: empty for CONNECT, else in origin form)."""
    lines = head.split(b"\r\n")
    try:
        method, target, version = lines[0].decode("ascii").split(" ")
        if method == "CONNECT":
            host, _, port = target.rpartition(":")
        else:
            url = urlsplit(target)
            host, port = url.hostname or "", str(url.port or 80)
            if url.scheme != "http":
                raise _Refused(400, "expected CONNECT host:port or an absolute http:// URI")
    except ValueError:
        raise _Refused(400, "malformed request line") from None
    host = host.strip("[]").lower().rstrip(".")
    if not (method.isalpha() and version.startswith("HTTP/1.") and host and port.isdigit()
            and 0 < int(port) < 65536) or any(c.isspace() or c in "/@" for c in host):
        raise _Refused(400, f"malformed request line or target {target!r}")
    if method == "CONNECT":
        return method, host, int(port), b""
    path = (url.path or "/") + (f"?{url.query}" if url.query else "")
    headers = [h for h in lines[1:] if h.split(b":", 1)[0].strip().lower() not in _HOP]
    if not any(h.split(b":", 1)[0].strip().lower() == b"host" for h in headers):
        headers.insert(0, b"Host: " + url.netloc.rpartition("@")[2].encode())
    return method, host, int(port), b"\r\n".join(
        [f"{method} {path} {version}".encode(), *headers, b"Connection: close", b"", b""])
