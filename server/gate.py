"""A TLS front door that lets the parties reach a SuperLink's Fleet API and nothing else.

    python -m server.gate --host 0.0.0.0 --port 9092 --upstream 127.0.0.1:PORT \
        --certfile server.crt --keyfile server.key --ca ca.crt

Flower 1.41 serves the Fleet API (SuperNodes), the Control API (``flwr run``,
``flwr supernode register``, logs) and the ServerApp's runtime API on one port, and the
open-source build has no account authentication on the Control API: whoever reaches that port
could register a key of their own or submit a run (code that the server host then executes).
``liquid-fed server-host`` therefore binds the SuperLink to 127.0.0.1 and puts this gate on the
public address: it terminates TLS with the SuperLink's own certificate, forwards ``POST
/v1/fleet/...`` requests (body and headers, including the SuperNode's signed-timestamp
authentication, which the SuperLink still checks) to the SuperLink over TLS on loopback, and
answers everything else with 404 without forwarding it.

Requests are streamed, never buffered whole, and bounded: one whose ``Content-Length`` exceeds
``max_request`` (:data:`MAX_REQUEST_BYTES`, ``--max-request-mb``) is answered 413 before a byte
of its body is read, and one without a length is cut off with 413 as soon as it passes the
limit (the SuperLink then sees an incomplete request and drops it). The gate's memory stays
flat however many large requests arrive. The limit is sized from the largest legitimate
Fleet request, a party's reply carrying its expert's and optimizer's state (a checkpoint
without a data folder); ``tests/test_fleet_gate.py`` checks it stays 8x above that for every
shipped config.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import re
import ssl
import sys
from collections.abc import AsyncIterator

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

log = logging.getLogger("liquid_fed.fleet_gate")
_ENDPOINT = re.compile(r"[a-z][a-z0-9-]{0,63}")

FLEET_PREFIX = "/v1/fleet/"
#: The largest request body the gate forwards (bytes; see the module's docstring).
MAX_REQUEST_BYTES = 256 << 20
#: Hop-by-hop headers (RFC 9110 7.6.1) and those the proxy recomputes.
_DROP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
         "trailer", "transfer-encoding", "upgrade", "host", "content-length",
         "content-encoding", "accept-encoding"}


class _TooLarge(Exception):
    """A request body without a length ran past the limit while it was streamed."""


def _too_large(limit: int) -> JSONResponse:
    return JSONResponse({"detail": f"request body over {limit} bytes"}, status_code=413,
                        headers={"connection": "close"})


def make_app(upstream: str, ca: str | None, timeout: float = 60.0,
             max_request: int = MAX_REQUEST_BYTES) -> Starlette:
    """The gate's ASGI app: ``POST /v1/fleet/<rest>`` goes to ``https://<upstream>`` (verified
    against ``ca``), streamed both ways, bodies of at most ``max_request`` bytes; anything else
    is refused with 404."""
    client = httpx.AsyncClient(base_url=f"https://{upstream}",
                               verify=ssl.create_default_context(cafile=ca) if ca else True,
                               timeout=timeout)

    async def forward(request: Request) -> Response:
        # One plain endpoint name (Fleet's are like "pull-messages"): no "..", no encoded
        # slashes or dots that the upstream client would normalise into another API's path.
        if not _ENDPOINT.fullmatch(request.path_params["rest"]) or "%" in str(request.url):
            return await refuse(request)
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_request):
            return _too_large(max_request)  # before reading a byte of it
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP}
        headers["accept-encoding"] = "identity"
        if length is not None:
            headers["content-length"] = length

        async def body() -> AsyncIterator[bytes]:
            seen = 0
            async for chunk in request.stream():
                seen += len(chunk)
                if seen > max_request:
                    raise _TooLarge
                yield chunk

        try:
            upstream_request = client.build_request("POST", request.url.path, content=body(),
                                                    headers=headers)
            reply = await client.send(upstream_request, stream=True)
        except _TooLarge:
            return _too_large(max_request)
        except httpx.HTTPError as exc:
            log.warning("SuperLink unreachable: %s", exc)
            return JSONResponse({"detail": "SuperLink unreachable"}, status_code=502)
        out = {k: v for k, v in reply.headers.items() if k.lower() not in _DROP}
        return StreamingResponse(reply.aiter_raw(), status_code=reply.status_code,
                                 headers=out, background=BackgroundTask(reply.aclose))

    async def refuse(request: Request) -> Response:
        return JSONResponse({"detail": "Not Found"}, status_code=404)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await client.aclose()

    routes = [Route(FLEET_PREFIX + "{rest:path}", forward, methods=["POST"]),
              Route("/{rest:path}", refuse, methods=["GET", "POST", "PUT", "PATCH", "DELETE",
                                                     "HEAD", "OPTIONS"])]
    return Starlette(routes=routes, lifespan=lifespan)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.gate",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, metavar="HOST:PORT",
                        help="the SuperLink on loopback")
    parser.add_argument("--certfile", required=True)
    parser.add_argument("--keyfile", required=True)
    parser.add_argument("--ca", required=True, help="CA that signed the SuperLink's certificate")
    parser.add_argument("--max-request-mb", type=int, default=MAX_REQUEST_BYTES >> 20,
                        help="largest request body forwarded, in MiB (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one line per forwarded request
    log.info("Fleet gate on %s:%d -> %s (Fleet API only)", args.host, args.port, args.upstream)
    uvicorn.run(make_app(args.upstream, args.ca, max_request=args.max_request_mb << 20),
                host=args.host, port=args.port,
                ssl_certfile=args.certfile, ssl_keyfile=args.keyfile, log_level="warning",
                access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
