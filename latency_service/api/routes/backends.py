from __future__ import annotations

from fastapi import APIRouter

from latency_service.api.schemas import BackendPublic
from latency_service.backends import backend_statuses

router = APIRouter(tags=["backends"])


@router.get("/v1/backends")
def backends() -> list[BackendPublic]:
    """Every registered runtime, whether it can run here and, when not, what is missing."""
    return [BackendPublic(name=s.name, available=s.available, reason=s.reason) for s in backend_statuses()]
