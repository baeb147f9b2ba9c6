from __future__ import annotations

from fastapi import APIRouter

from latency_service.api.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/v1/health")
def health() -> Health:
    """Liveness; never needs a token (container health checks call it)."""
    return Health()
