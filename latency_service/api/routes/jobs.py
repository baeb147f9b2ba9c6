from __future__ import annotations

from fastapi import APIRouter, Query, status

from latency_service import job_store
from latency_service.api.deps import ServiceDep, SessionDep, WorkerDep
from latency_service.api.errors import parse_ops
from latency_service.api.schemas import JobCreate, JobCreated, JobPublic
from latency_service.backends import BackendUnavailable
from latency_service.models import Job
from latency_service.presets import preset_ops

router = APIRouter(tags=["jobs"])


@router.post("/v1/jobs", status_code=status.HTTP_202_ACCEPTED)
def create_job(body: JobCreate, service: ServiceDep, session: SessionDep, worker: WorkerDep) -> JobCreated:
    """Persist a profiling job (before anything runs) and queue it for this device's worker."""
    if service.backend_error is not None:
        raise BackendUnavailable(service.backend_error)
    if body.preset is not None:
        ops = preset_ops(body.preset)
    else:
        ops = parse_ops(body.ops or [], max_elements=service.settings.max_elements)
    job = job_store.create_job(
        session=session, device_id=service.device_id, ops=ops, force=body.force, preset=body.preset
    )
    session.commit()
    worker.notify()
    return JobCreated(id=job.id, status="queued", total=job.total)


def _public(session: SessionDep, jobs: list[Job]) -> list[JobPublic]:
    skipped = job_store.skipped_counts(session=session, job_ids=[job.id for job in jobs])
    return [JobPublic.model_validate(job).model_copy(update={"skipped": skipped[job.id]}) for job in jobs]


@router.get("/v1/jobs")
def list_jobs(
    service: ServiceDep, session: SessionDep, limit: int = Query(default=50, ge=1, le=1000)
) -> list[JobPublic]:
    return _public(session, job_store.list_jobs(session=session, device_id=service.device_id, limit=limit))


@router.get("/v1/jobs/{job_id}")
def get_job(job_id: int, session: SessionDep) -> JobPublic:
    return _public(session, [job_store.job_progress(session=session, job_id=job_id)])[0]


@router.delete("/v1/jobs/{job_id}")
def cancel_job(job_id: int, session: SessionDep) -> JobPublic:
    """Cancel: a queued job never starts, a running one stops before its next variant."""
    job = job_store.cancel_job(session=session, job_id=job_id)
    session.commit()
    return _public(session, [job])[0]
