"""The egress proxy and the in-sandbox forwarder, driven in-process over real socketpairs.

Everything here targets 127.0.0.1 only: two HTTP servers (one allowlisted, one not),
the forwarder's listening port, and the proxy's side channel (a socketpair).
"""

from __future__ import annotations

import http.client
import http.server
import json
import logging
import os
import socket
import threading
import urllib.request

import pytest

from dynwf_ray.sandbox.egress import EgressProxy, _public, _ip, proxy_env, start_forwarder


_BIG = os.urandom(4 << 20)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    connections = 0

    def process_request(self, request, client_address):
        self.connections += 1  # counted before any byte of a request is read
        super().process_request(request, client_address)


def _serve(body: bytes) -> _Server:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body_ = _BIG if self.path == "/big" else body
            self.send_response(200)
            self.send_header("Content-Length", str(len(body_)))
            self.send_header("X-Path", self.path)
            self.end_headers()
            self.wfile.write(body_)

        def log_message(self, *args):
            pass

    server = _Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def servers():
    one, two = _serve(b"hello from one"), _serve(b"hello from two")
    yield one, two
    for s in (one, two):
        s.shutdown()
        s.server_close()


def _sandbox(allow, **kw):
    """A proxy attached to one 'sandbox' whose forwarder runs here; returns (proxy, port, side)."""
    proxy = EgressProxy(allow, **kw)
    trusted, side = socket.socketpair()
    proxy.attach(trusted, "tenant-a")
    return proxy, start_forwarder(side, 0), side


def _raw(port: int, request: bytes, keep: bool = False):
    """Send `request` to the forwarder; return the status line's code (and the socket if keep)."""
    conn = socket.create_connection(("127.0.0.1", port), timeout=10)
    conn.sendall(request)
    reader = conn.makefile("rb")
    status = int(reader.readline().split()[1])
    if keep:
        while reader.readline() not in (b"\r\n", b""):  # rest of the response head
            pass
        return status, conn, reader
    rest = reader.read()
    conn.close()
    return status, rest


def _port(server) -> int:
    return server.server_address[1]


@pytest.fixture(autouse=True)
def _no_proxy_env(monkeypatch):
    for name in ("no_proxy", "NO_PROXY", "http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)


def test_allowed_by_urllib_and_connect(servers, monkeypatch):
    one, _ = servers
    proxy, port, _ = _sandbox([f"127.0.0.1:{_port(one)}"])
    try:
        # Plain HTTP with an absolute URI, the proxy found through proxy_env.
        for name, value in proxy_env(port).items():
            monkeypatch.setenv(name, value)
        opener = urllib.request.build_opener()
        with opener.open(f"http://127.0.0.1:{_port(one)}/a?b=c", timeout=10) as r:
            assert r.read() == b"hello from one"
            assert r.headers["X-Path"] == "/a?b=c"  # rewritten to origin form
        # CONNECT, then HTTP inside the tunnel (what an HTTPS client does, minus TLS).
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.set_tunnel("127.0.0.1", _port(one))
        conn.request("GET", "/tunnel")
        response = conn.getresponse()
        assert (response.status, response.read()) == (200, b"hello from one")
        conn.close()
    finally:
        proxy.close()


def test_proxy_env():
    env = proxy_env(4321)
    assert env["HTTPS_PROXY"] == env["HTTP_PROXY"] == "http://127.0.0.1:4321"
    assert env["NO_PROXY"] == ""


def test_not_allowlisted_gets_403_and_server_sees_nothing(servers, caplog):
    one, two = servers
    proxy, port, _ = _sandbox([f"127.0.0.1:{_port(one)}"])
    before = two.connections
    try:
        with caplog.at_level(logging.WARNING, logger="dynwf_ray.egress"):
            target = f"127.0.0.1:{_port(two)}"
            assert _raw(port, f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())[0] == 403
            status, body = _raw(port, f"GET http://{target}/ HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
            assert status == 403 and b"allowlist" in body
        assert two.connections == before
        denied = [r.getMessage() for r in caplog.records if r.name == "dynwf_ray.egress"]
        assert denied and all("tenant-a" in m and target in m for m in denied)
    finally:
        proxy.close()


def test_name_resolving_to_loopback_is_refused(servers):
    one, _ = servers
    port1 = _port(one)
    calls = []

    def resolve(host, port, *args):
        calls.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    before = one.connections
    proxy, port, _ = _sandbox([f"svc.example.com:{port1}", f"*.example.org:{port1}"], resolve=resolve)
    try:
        for name in ("svc.example.com", "a.b.example.org"):
            status, body = _raw(port, f"CONNECT {name}:{port1} HTTP/1.1\r\n\r\n".encode())
            assert status == 403 and b"non-public" in body
        assert calls == ["svc.example.com", "a.b.example.org"]  # allowlisted, then resolved here
        assert _raw(port, f"CONNECT example.org:{port1} HTTP/1.1\r\n\r\n".encode())[0] == 403
        assert _raw(port, f"CONNECT svc.example.com:{port1 + 1} HTTP/1.1\r\n\r\n".encode())[0] == 403
        assert len(calls) == 2  # not-allowlisted targets are never resolved
        assert one.connections == before
    finally:
        proxy.close()
    # Naming localhost explicitly is what lets a tenant reach loopback.
    proxy, port, _ = _sandbox([f"localhost:{port1}"])
    try:
        status, conn, reader = _raw(port, f"CONNECT localhost:{port1} HTTP/1.1\r\n\r\n".encode(), keep=True)
        assert status == 200
        conn.close()
    finally:
        proxy.close()


def test_public_address_check():
    for text in ("127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "0.0.0.0",
                 "224.0.0.1", "100.64.0.1", "::1", "fe80::1", "fc00::1", "::ffff:127.0.0.1", "::7f00:1", "::"):
        assert not _public(_ip(text)), text
    for text in ("93.184.216.34", "2606:2800:220:1::1"):
        assert _public(_ip(text)), text


def test_malformed_requests_get_400(servers):
    one, _ = servers
    proxy, port, _ = _sandbox([f"127.0.0.1:{_port(one)}"])
    try:
        for bad in (b"garbage\r\n\r\n", b"GET /relative HTTP/1.1\r\nHost: x\r\n\r\n",
                    b"CONNECT nohost HTTP/1.1\r\n\r\n", b"CONNECT a:99999 HTTP/1.1\r\n\r\n",
                    b"GET http://a:xx/ HTTP/1.1\r\n\r\n", b"GET https://a/ HTTP/1.1\r\n\r\n",
                    b"\xff\xfe\r\n\r\n", b"GET http://a/ HTTP/1.1\r\nX: " + b"y" * 9000 + b"\r\n\r\n"):
            assert _raw(port, bad)[0] == 400, bad
        conn = socket.create_connection(("127.0.0.1", port), timeout=10)
        conn.close()  # closed before any request: nothing to answer
        with urllib.request.build_opener(
            urllib.request.ProxyHandler({"http": f"http://127.0.0.1:{port}"})
        ).open(f"http://127.0.0.1:{_port(one)}/", timeout=10) as r:
            assert r.read() == b"hello from one"  # still serving
    finally:
        proxy.close()


def test_side_channel_ignores_sandbox_fds_and_bad_lines():
    proxy = EgressProxy(["127.0.0.1:1"])
    trusted, side = socket.socketpair()
    proxy.attach(trusted, "tenant-a")
    mine, theirs = socket.socketpair()
    try:
        side.settimeout(10)
        socket.send_fds(side, [b'{"op": "open"}\n'], [theirs.fileno()])
        theirs.close()
        data, fds, _, _ = socket.recv_fds(side, 4096, 4)
        assert json.loads(data) == {"ok": True} and len(fds) == 1
        os.close(fds[0])
        # The proxy closed the fd it was sent, unused: our end sees EOF, not data.
        mine.settimeout(10)
        assert mine.recv(1) == b""
        side.sendall(b"not json\n")
        assert json.loads(side.recv(4096))["ok"] is False
        side.sendall(b'{"op": "open"}\n')  # the channel still works
        data, fds, _, _ = socket.recv_fds(side, 4096, 4)
        assert json.loads(data) == {"ok": True}
        os.close(fds[0])
    finally:
        proxy.close()
        mine.close()
        side.close()


def test_max_tunnels(servers):
    one, _ = servers
    target = f"127.0.0.1:{_port(one)}"
    proxy, port, _ = _sandbox([target], max_tunnels=2)
    held = []
    try:
        for _ in range(2):
            status, conn, reader = _raw(port, f"CONNECT {target} HTTP/1.1\r\n\r\n".encode(), keep=True)
            assert status == 200
            held.append(conn)
        assert _raw(port, f"CONNECT {target} HTTP/1.1\r\n\r\n".encode())[0] == 429
        held.pop().close()
        for _ in range(100):  # the freed slot comes back once the tunnel has wound down
            status, conn, reader = _raw(port, f"CONNECT {target} HTTP/1.1\r\n\r\n".encode(), keep=True)
            if status == 200:
                held.append(conn)
                break
            conn.close()
            threading.Event().wait(0.05)
        assert status == 200
    finally:
        for conn in held:
            conn.close()
        proxy.close()


def test_unreachable_is_502():
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    dead = free.getsockname()[1]
    free.close()  # nothing listens there now
    proxy, port, _ = _sandbox([f"127.0.0.1:{dead}"], connect_timeout=2)
    try:
        assert _raw(port, f"CONNECT 127.0.0.1:{dead} HTTP/1.1\r\n\r\n".encode())[0] == 502
    finally:
        proxy.close()


def test_close_ends_tunnels(servers):
    one, _ = servers
    target = f"127.0.0.1:{_port(one)}"
    proxy, port, _ = _sandbox([target])
    status, conn, reader = _raw(port, f"CONNECT {target} HTTP/1.1\r\n\r\n".encode(), keep=True)
    assert status == 200
    proxy.close()
    conn.settimeout(10)
    assert reader.read() == b""  # the tunnel was torn down
    conn.close()
    x, y = socket.socketpair()
    with pytest.raises(RuntimeError):
        proxy.attach(x, "tenant-a")
    x.close()
    y.close()


def test_large_body_and_half_close(servers):
    one, _ = servers
    target = f"127.0.0.1:{_port(one)}"
    proxy, port, _ = _sandbox([target])
    try:
        # Many megabytes through both relays (the forwarder's and the proxy's), in parallel.
        results = []

        def fetch():
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.set_tunnel("127.0.0.1", _port(one))
            conn.request("GET", "/big")
            results.append(conn.getresponse().read() == _BIG)
            conn.close()

        threads = [threading.Thread(target=fetch) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results == [True] * 4
        # A client that half-closes after its request still gets the whole answer.
        conn = socket.create_connection(("127.0.0.1", port), timeout=10)
        conn.sendall(f"GET http://{target}/half HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        conn.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
        conn.close()
        assert answer.startswith(b"HTTP/1.0 200") and answer.endswith(b"hello from one")
    finally:
        proxy.close()
