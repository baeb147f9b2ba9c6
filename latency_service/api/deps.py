"""Dependencies as typed aliases: a route asks for ``SessionDep`` or ``ServiceDep`` and gets it."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from latency_service import store
from latency_service.api.errors import ConflictError
from latency_service.config import Settings
from latency_service.jobs import JobWorker, MeasuringSession
from predictors.fitting import LatencyPredictor


@dataclass
class ServiceState:
    """What one running service holds: its settings, database, identity and the worker of its device."""

    settings: Settings
    engine: Engine
    session_factory: sessionmaker[Session]
    device_id: str
    device_class: str
    measuring: MeasuringSession
    worker: JobWorker
    backend_error: str | None = None
    _predictor: tuple[int, LatencyPredictor] | None = None
    _predictor_lock: threading.Lock = field(default_factory=threading.Lock)

    def predictor(self, session: Session) -> tuple[LatencyPredictor, str]:
        """The newest predictor of this device class, parsed once per fitted version; 409 when there is none."""
        row = store.latest_predictor(session=session, device_class=self.device_class)
        if row is None:
            raise ConflictError("no predictor has been fitted yet: POST /v1/predictors/fit after profiling")
        with self._predictor_lock:
            if self._predictor is None or self._predictor[0] != row.id:
                self._predictor = (row.id, LatencyPredictor.from_json(row.payload))
            return self._predictor[1], row.version


def get_service(request: Request) -> ServiceState:
    service: ServiceState = request.app.state.service
    return service


ServiceDep = Annotated[ServiceState, Depends(get_service)]


def get_settings(service: ServiceDep) -> Settings:
    return service.settings


def get_worker(service: ServiceDep) -> JobWorker:
    return service.worker


def get_session(service: ServiceDep) -> Iterator[Session]:
    session = service.session_factory()
    try:
        yield session
    finally:
        # Routes commit what they mean to keep; anything left uncommitted (an error half-way) is rolled back here.
        session.rollback()
        session.close()


SettingsDep = Annotated[Settings, Depends(get_settings)]
WorkerDep = Annotated[JobWorker, Depends(get_worker)]
SessionDep = Annotated[Session, Depends(get_session)]

_bearer = HTTPBearer(auto_error=False, description="The service token (FIGS_TOKEN), when one is configured")


def require_token(
    settings: SettingsDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    if settings.token is None:
        return
    supplied = credentials.credentials if credentials is not None else ""
    if not secrets.compare_digest(supplied.encode(), settings.token.get_secret_value().encode()):
        raise HTTPException(
            status_code=status.HTTP_401_UNAUTHORIZED,
            detail="missing or wrong bearer token",
            headers={"WWW-Authenticate": "Bearer"},
        )
