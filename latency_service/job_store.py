"""Store functions of the profiling job queue: jobs, their items, leases and progress.

Like ``latency_service.store`` (whose devices and variants they use), every function is keyword-only and takes the
caller's session; none commits.  ``create_job`` writes the job, its variants and its items together or not at all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from latency_service.models import UNFINISHED_JOB_STATUSES, Job, JobItem, utcnow
from latency_service.store import get_or_create_variants
from predictors.ops import OpSpec


class JobNotFoundError(LookupError):
    def __init__(self, job_id: int) -> None:
        super().__init__(f"no job with id {job_id}")
        self.job_id = job_id


def create_job(
    *,
    session: Session,
    device_id: str,
    ops: Sequence[OpSpec],
    force: bool = False,
    preset: str | None = None,
    claimed_by: str | None = None,
) -> Job:
    """A job with one item per distinct op, in order: queued, or already running for ``claimed_by`` (a process that
    runs it itself, so that no worker can take it in between)."""
    if not ops:
        raise ValueError("a job needs at least one operator")
    # Repeats of one variant are measured once: get_or_create_variants returns each key once, in first-seen order.
    ordered = get_or_create_variants(session=session, ops=ops)
    job = Job(device_id=device_id, status="queued", force=force, preset=preset, total=len(ordered), done=0, failed=0)
    if claimed_by is not None:
        job.status, job.claimed_by = "running", claimed_by
        job.started_at = job.heartbeat_at = utcnow()
    session.add(job)
    session.flush()
    session.add_all(
        JobItem(job_id=job.id, position=i, variant_key=key, status="pending") for i, key in enumerate(ordered)
    )
    session.flush()
    return job


def get_job(*, session: Session, job_id: int) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise JobNotFoundError(job_id)
    return job


def job_progress(*, session: Session, job_id: int) -> Job:
    return get_job(session=session, job_id=job_id)


def list_jobs(*, session: Session, device_id: str, limit: int = 50) -> list[Job]:
    query = select(Job).where(Job.device_id == device_id).order_by(Job.id.desc()).limit(limit)
    return list(session.scalars(query))


def unfinished_jobs(*, session: Session, device_id: str) -> list[Job]:
    """Jobs left running (a crash) come first, then queued ones, each oldest first."""
    query = select(Job).where(Job.device_id == device_id, Job.status.in_(UNFINISHED_JOB_STATUSES))
    jobs = list(session.scalars(query.order_by(Job.id)))
    return sorted(jobs, key=lambda job: (job.status != "running", job.id))


def claim_next_job(
    *, session: Session, device_id: str, worker_id: str, is_abandoned: Callable[[Job], bool]
) -> Job | None:
    """Lease the next job of this device to ``worker_id``: a queued one, or a running one whose runner is gone
    (``is_abandoned``; a crash leaves its job ``running``).  Jobs a live process is running are left alone."""
    for job in unfinished_jobs(session=session, device_id=device_id):
        if job.status == "running" and job.claimed_by != worker_id and not is_abandoned(job):
            continue
        if job.status == "queued":
            job.status = "running"
            job.started_at = utcnow()
        job.claimed_by = worker_id
        job.heartbeat_at = utcnow()
        session.flush()
        return job
    return None


def release_job(*, session: Session, job_id: int) -> Job:
    """Give up the lease of a job that stays unfinished, so that any worker may resume it at once."""
    job = get_job(session=session, job_id=job_id)
    job.claimed_by = None
    session.flush()
    return job


def pending_items(*, session: Session, job_id: int) -> list[JobItem]:
    query = select(JobItem).where(JobItem.job_id == job_id, JobItem.status == "pending").order_by(JobItem.position)
    return list(session.scalars(query))


def mark_item(*, session: Session, job_id: int, position: int, status: str, error: str | None = None) -> Job:
    """Record an item's outcome and the job's counters: skipped items count as done."""
    if status not in ("done", "failed", "skipped"):
        raise ValueError(f"an item ends done, failed or skipped, not {status!r}")
    item = session.get(JobItem, (job_id, position))
    if item is None:
        raise LookupError(f"job {job_id} has no item {position}")
    job = get_job(session=session, job_id=job_id)
    if item.status != "pending":
        return job
    item.status = status
    item.error = error
    job.heartbeat_at = utcnow()
    if status == "failed":
        job.failed += 1
    else:
        job.done += 1
    session.flush()
    return job


def skipped_counts(*, session: Session, job_ids: Sequence[int]) -> dict[int, int]:
    """Items per job that were skipped (measured before, or cancelled); they are included in ``done``."""
    query = (
        select(JobItem.job_id, func.count())
        .where(JobItem.job_id.in_(job_ids), JobItem.status == "skipped")
        .group_by(JobItem.job_id)
    )
    counts = {job_id: 0 for job_id in job_ids}
    counts.update({job_id: int(count) for job_id, count in session.execute(query)})
    return counts


def first_item_error(*, session: Session, job_id: int) -> str | None:
    query = select(JobItem.error).where(JobItem.job_id == job_id, JobItem.status == "failed")
    return session.scalars(query.order_by(JobItem.position).limit(1)).first()


def job_status(*, session: Session, job_id: int) -> str:
    status = session.scalar(select(Job.status).where(Job.id == job_id))
    if status is None:
        raise JobNotFoundError(job_id)
    return status


def finish_job(*, session: Session, job_id: int, status: str, error: str | None = None) -> Job:
    job = get_job(session=session, job_id=job_id)
    if job.status in UNFINISHED_JOB_STATUSES:
        job.status = status
        job.error = error
        job.finished_at = utcnow()
    session.flush()
    return job


def cancel_job(*, session: Session, job_id: int) -> Job:
    """Cancel a queued or running job (the worker stops before its next variant); finished jobs stay as they are."""
    job = get_job(session=session, job_id=job_id)
    if job.status in UNFINISHED_JOB_STATUSES:
        job.status = "cancelled"
        job.finished_at = utcnow()
        session.execute(
            update(JobItem)
            .where(JobItem.job_id == job_id, JobItem.status == "pending")
            .values(status="skipped", error="cancelled")
        )
    session.flush()
    return job
