"""The Fleet gate: over TLS, only ``POST /v1/fleet/...`` reaches the SuperLink behind it, with
its body and authentication headers intact; the Control API and anything else never do."""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from liquid_fed.procs import free_port
from server.gate import make_app
from server.keys import make_keys


def _trust(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))


def _serve(app: object, port: int, keys) -> tuple[uvicorn.Server, threading.Thread]:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           ssl_certfile=str(keys.server.cert),
                                           ssl_keyfile=str(keys.server.key),
                                           log_level="error", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    return server, thread


@pytest.fixture(scope="module")
def gate(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, list]]:
    keys = make_keys(tmp_path_factory.mktemp("k") / "keys", 1)
    seen: list[tuple[str, str, bytes, str | None]] = []

    async def echo(request: Request) -> Response:
        body = await request.body()
        seen.append((request.method, request.url.path, body,
                     request.headers.get("flwr-signature")))
        return Response(b"upstream:" + body, status_code=201,
                        headers={"content-type": "application/protobuf", "x-upstream": "1"})

    upstream_app = Starlette(routes=[Route("/{rest:path}", echo, methods=["GET", "POST"])])
    up_port, gate_port = free_port(), free_port()
    upstream, t1 = _serve(upstream_app, up_port, keys)
    front, t2 = _serve(make_app(f"127.0.0.1:{up_port}", str(keys.server.ca)), gate_port, keys)
    try:
        yield f"https://127.0.0.1:{gate_port}", keys.party(0).ca, seen, upstream
    finally:
        for server, thread in ((front, t2), (upstream, t1)):
            server.should_exit = True
            thread.join(10)


def test_fleet_requests_pass_with_body_and_auth_headers(gate) -> None:
    url, ca, seen, _ = gate
    seen.clear()
    body = bytes(range(256)) * 40_000  # 10 MB: bigger than Flower's 5 MiB chunks
    reply = httpx.post(f"{url}/v1/fleet/push-object", content=body, verify=_trust(ca),
                       headers={"flwr-signature": "c2ln", "content-type": "application/protobuf"},
                       timeout=60)
    assert reply.status_code == 201 and reply.content == b"upstream:" + body
    assert reply.headers["x-upstream"] == "1"
    assert seen == [("POST", "/v1/fleet/push-object", body, "c2ln")]


def test_everything_but_the_fleet_api_is_refused_before_the_superlink(gate) -> None:
    url, ca, seen, _ = gate
    seen.clear()
    for method, path in [("POST", "/v1/control/start-run"),
                         ("POST", "/v1/control/register-node"),
                         ("POST", "/v1/runtime/pull-task-input"),
                         ("GET", "/v1/fleet/pull-messages"), ("POST", "/v1/fleetx"),
                         ("POST", "/v1/fleet/../control/start-run"),
                         ("POST", "/v1/fleet/%2e%2e/control/start-run"),
                         ("POST", "/v1/fleet/..%2fcontrol%2fstart-run"),
                         ("POST", "/v1/fleet/x/../../control/start-run"), ("GET", "/")]:
        reply = httpx.request(method, url + path, content=b"x", verify=_trust(ca), timeout=30)
        assert reply.status_code in (404, 405), (method, path, reply.status_code)
    assert seen == [], "a refused request reached the SuperLink"


def test_a_client_not_trusting_the_ca_is_refused(gate, tmp_path: Path) -> None:
    url, _, seen, _ = gate
    other = make_keys(tmp_path / "other", 1)
    with pytest.raises(httpx.ConnectError):
        httpx.post(f"{url}/v1/fleet/x", content=b"x", verify=_trust(other.ca_cert), timeout=30)


@pytest.fixture(scope="module")
def small_gate(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, list]]:
    """A gate with a 1 MiB limit in front of an upstream that counts what it receives."""
    keys = make_keys(tmp_path_factory.mktemp("k") / "keys", 1)
    received: list[int] = []

    async def count(request: Request) -> Response:
        n = 0
        async for chunk in request.stream():
            n += len(chunk)
        received.append(n)
        return Response(str(n).encode(), status_code=200)

    upstream_app = Starlette(routes=[Route("/{rest:path}", count, methods=["POST"])])
    up_port, gate_port = free_port(), free_port()
    upstream, t1 = _serve(upstream_app, up_port, keys)
    front, t2 = _serve(make_app(f"127.0.0.1:{up_port}", str(keys.server.ca),
                                max_request=1 << 20), gate_port, keys)
    try:
        yield gate_port, keys.party(0).ca, received
    finally:
        for server, thread in ((front, t2), (upstream, t1)):
            server.should_exit = True
            thread.join(10)


def test_oversized_requests_are_refused_before_they_are_read(small_gate) -> None:
    import socket

    port, ca, received = small_gate
    url = f"https://127.0.0.1:{port}/v1/fleet/push-messages"
    with httpx.Client(verify=_trust(ca)) as client:
        ok = client.post(url, content=b"x" * 1000)
        assert ok.status_code == 200 and ok.text == "1000"  # within the limit: forwarded
        # A declared 700 MB body: the answer comes before any of it is sent.
        with socket.create_connection(("127.0.0.1", port)) as raw:
            tls = _trust(ca).wrap_socket(raw, server_hostname="127.0.0.1")
            tls.sendall(b"POST /v1/fleet/push-messages HTTP/1.1\r\nHost: x\r\n"
                        b"Content-Length: 734003200\r\n\r\n")
            head = b""
            while chunk := tls.recv(4096):  # the gate closes the connection after its answer
                head += chunk
        assert head.startswith(b"HTTP/1.1 413") and b"over 1048576 bytes" in head

        # No declared length: cut off once past the limit; the upstream never gets it whole.
        def chunks():
            for _ in range(64):
                yield b"y" * (64 << 10)  # 4 MiB in all

        refused = client.post(url, content=chunks())
        assert refused.status_code == 413
    assert received == [1000]


def test_the_gates_memory_stays_flat_while_it_streams(small_gate) -> None:
    import resource

    port, ca, received = small_gate
    url = f"https://127.0.0.1:{port}/v1/fleet/push-object"
    peak0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    block = b"z" * (256 << 10)
    with httpx.Client(verify=_trust(ca), timeout=60) as client:
        for _ in range(40):  # 40 requests of 4 MiB, each refused at 1 MiB
            assert client.post(url, content=iter([block] * 16)).status_code == 413
        for _ in range(200):  # 200 requests of 768 KiB, forwarded
            assert client.post(url, content=iter([block] * 3)).status_code == 200
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak0
    assert received[-200:] == [3 * len(block)] * 200
    assert grown < 64 << 10, f"peak memory grew by {grown} KiB over 310 MiB sent"


def test_the_limit_is_far_above_the_largest_legitimate_request() -> None:
    from liquid_fed.centralized import central_data
    from liquid_fed.config import load_config
    from liquid_fed.federation.setup import build_client_expert
    from server.gate import MAX_REQUEST_BYTES

    root = Path(__file__).resolve().parent.parent / "configs"
    largest = 0
    for name in ("quickstart", "regions", "regression"):
        cfg = load_config(root / f"{name}.yaml")
        data = central_data(cfg)
        for k, view in enumerate(data.views):
            expert = build_client_expert(cfg, k, view.in_shape, data.server.n_outputs)
            # A state reply: parameters and two optimizer moments, float64 at worst.
            largest = max(largest, expert.n_parameters() * 3 * 8)
    assert largest > 10_000 and MAX_REQUEST_BYTES >= 8 * largest
