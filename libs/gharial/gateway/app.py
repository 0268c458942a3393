"""The gateway as a FastAPI app: the stream endpoint, probes, metrics and FastAPI's `/docs`.

- `/healthz`: the process is up (liveness);
- `/readyz`: new streams can be placed — Redis reachable, or a static transcriber has room, and
  the gateway is not shutting down (readiness; 503 otherwise);
- `/metrics`: Prometheus text (prometheus-client's default registry: the gateway's and the
  balancer's metrics);
- `/` and `/static/...`: the demo page (microphone or file → the stream endpoint, live transcript
  and latency), so a browser on the gateway's own origin needs nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI, Response
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gharial.balancer import LoadBalancer
from gharial.gateway.auth import ApiKeys
from gharial.gateway.channels import Channels
from gharial.gateway.messages import STREAM_PATH
from gharial.gateway.session import StreamEndpoint
from gharial.gateway.settings import GatewaySettings
from gharial.gateway.workers import BalancedWorkers, Readiness, StaticWorkers, Workers

STATIC_DIR = Path(__file__).parent / "static"  # package data (pyproject.toml)

DESCRIPTION = f"""Streaming speech recognition over a websocket: `GET {STREAM_PATH}` (the CAIMAN-ASR
websocket API). Query parameters: `content_type` (default
`audio/x-raw;format=S16LE;channels=1;rate=16000`, the only one supported), `model`, `version`,
`lang`, `alternatives`. Send audio in binary frames of any length > 0 and a zero-length binary
frame at the end; each 60 ms of audio gets one JSON text frame
`{{"start", "end", "is_provisional", "alternatives": [{{"transcript", "confidence"}}]}}`, and the
server closes with 1000 after the final one. Errors close the connection with a reason starting
with a status: 400 invalid parameters, 401 missing or wrong API key, 503 no capacity."""


def create_app(settings: GatewaySettings) -> FastAPI:
    channels = Channels()
    workers: Workers
    balancer: LoadBalancer | None = None
    if settings.redis_url is not None:
        balancer = LoadBalancer(settings.redis_url, lease_s=settings.lease_s)
        workers = BalancedWorkers(balancer)
    else:
        workers = StaticWorkers(settings.transcribers, channels)
    endpoint = StreamEndpoint(settings, workers, channels, ApiKeys(settings.api_key_hashes))

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        upkeep = asyncio.create_task(workers.maintain())
        try:
            yield
        finally:
            upkeep.cancel()
            await channels.close()
            if balancer is not None:
                balancer.close()

    app = FastAPI(title="Gharial gateway", description=DESCRIPTION, lifespan=lifespan)
    app.add_api_websocket_route(STREAM_PATH, endpoint, name="stream")
    app.state.streams = endpoint  # for the server's shutdown (draining)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
    async def readyz() -> JSONResponse:
        """New streams can be placed: Redis reachable, or a static transcriber with room."""
        draining = Readiness(ready=False, detail="shutting down")
        readiness = draining if endpoint.draining else await workers.readiness()
        return JSONResponse(readiness.model_dump(), status_code=200 if readiness.ready else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus metrics."""
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def demo_page() -> FileResponse:
        """The demo page; its scripts and styles are under /static."""
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
