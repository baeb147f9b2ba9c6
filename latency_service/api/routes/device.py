from __future__ import annotations

from fastapi import APIRouter

from latency_service import store
from latency_service.api.deps import ServiceDep, SessionDep
from latency_service.api.schemas import DevicePublic

router = APIRouter(tags=["device"])


@router.get("/v1/device")
def device(service: ServiceDep, session: SessionDep) -> DevicePublic:
    row = store.get_device(session=session, device_id=service.device_id)
    if row is None:  # the lifespan writes the row before serving; a missing one is a wiped database
        raise RuntimeError(f"device {service.device_id} is missing from the store")
    return DevicePublic(
        device_id=row.id,
        device_class=row.device_class,
        backend=row.backend,
        backend_version=row.backend_version,
        host=row.host,
    )
