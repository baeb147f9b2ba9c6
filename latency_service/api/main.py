"""The FastAPI application: ``create_app(settings)`` wires routers, the token guard, the body cap and the errors."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from latency_service import store
from latency_service.api.deps import ServiceState, require_token
from latency_service.api.errors import install_error_handlers
from latency_service.api.routes import (
    backends,
    device,
    health,
    jobs,
    measurements,
    models,
    predict,
    predictors,
    presets,
    tables,
)
from latency_service.backends import BackendUnavailable
from latency_service.config import Settings
from latency_service.db import make_engine, make_session_factory, migrate, transaction
from latency_service.environment import host_environment
from latency_service.jobs import JobWorker, MeasuringSession

logger = logging.getLogger(__name__)

MODEL_CONTENT_TYPE = b"application/octet-stream"


class BodySizeLimit:
    """Refuse request bodies over the cap with 413 before any route sees them.

    The declared Content-Length is checked first; a chunked body is counted as it streams.  ONNX uploads
    (application/octet-stream) get their own, larger cap.
    """

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, max_model_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_model_bytes = max_model_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        limit = self.max_model_bytes if content_type == MODEL_CONTENT_TYPE else self.max_body_bytes
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._refuse(send, limit)
            return
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                await self._refuse(send, limit)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(send: Send, limit: int) -> None:
        payload = f'{{"detail":"request body exceeds {limit} bytes"}}'.encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": payload})


def _start_service(settings: Settings) -> ServiceState:
    """Migrate, register this device, and start its worker (which resumes unfinished jobs)."""
    url = settings.database_url
    engine = make_engine(url)
    migrate(url, engine=engine)
    session_factory = make_session_factory(engine)
    measuring = MeasuringSession(settings)
    backend_error: str | None = None
    try:
        backend_version = measuring.backend.runtime_version
    except (BackendUnavailable, KeyError) as exc:
        backend_error, backend_version = str(exc), "unavailable"
    device_id, device_class = settings.resolved_device_id, settings.resolved_device_class
    with transaction(session_factory) as session:
        store.upsert_device(
            session=session,
            device_id=device_id,
            device_class=device_class,
            backend=settings.backend,
            backend_version=backend_version,
            host=host_environment(),
        )
    worker = JobWorker(device_id=device_id, session_factory=session_factory, measuring=measuring)
    if backend_error is None:
        worker.start()
    else:
        logger.warning("backend %s unavailable (%s): jobs are refused with 503", settings.backend, backend_error)
    return ServiceState(
        settings=settings,
        engine=engine,
        session_factory=session_factory,
        device_id=device_id,
        device_class=device_class,
        measuring=measuring,
        worker=worker,
        backend_error=backend_error,
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service = _start_service(settings)
        app.state.service = service
        try:
            yield
        finally:
            service.worker.stop()
            service.engine.dispose()

    app = FastAPI(
        title="FiGS latency service",
        version="1",
        description="Profiles operator variants on this device, fits latency predictors and serves them.",
        lifespan=lifespan,
    )
    app.add_middleware(BodySizeLimit, max_body_bytes=settings.max_body_bytes, max_model_bytes=settings.max_model_bytes)
    install_error_handlers(app)
    app.include_router(health.router)
    guarded = [Depends(require_token)]
    for module in (device, backends, jobs, measurements, predictors, predict, tables, presets, models):
        app.include_router(module.router, dependencies=guarded)
    return app
