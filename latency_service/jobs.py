"""Profiling jobs: one worker per service process measures variants strictly one at a time.

Two timings that overlap on one CPU corrupt both, so every measurement in the process — job items here, whole
models in ``api/routes/models.py`` — runs under :data:`MEASUREMENT_LOCK`.  Jobs live in the store: a job is written
before it runs, each item's measurement and its ``done`` mark are committed together, and a restarted worker picks up
jobs left ``running`` or ``queued`` where they stopped.
"""

from __future__ import annotations

import inspect
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from latency_service import job_store, store
from latency_service.backends import Backend, backend_class, create_backend
from latency_service.clock_gate import ClockGate
from latency_service.config import Settings
from latency_service.db import transaction
from latency_service.environment import host_environment
from latency_service.measurement import MeasurementConfig, measure_overhead, measure_sessions
from latency_service.measurement_lock import MEASUREMENT_LOCK
from latency_service.models import Job, utcnow
from predictors.ops import op_from_dict

logger = logging.getLogger(__name__)


# A job whose runner has not reported for this long is taken over; items take seconds, so this is generous.
JOB_LEASE_S = 120.0
# Backend constructor keywords that settings can fill, by the name each backend gives them.
_THREAD_KEYWORDS = ("intra_op_threads", "num_threads", "threads")
_OPT_LEVEL_KEYWORDS = ("optimization_level",)

ProgressCallback = Callable[[Job], None]


def new_worker_id() -> str:
    """``host:pid:token``: identifies one running process across the store (the token guards against pid reuse)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def job_abandoned(job: Job, *, lease_s: float = JOB_LEASE_S) -> bool:
    """Whether a running job's process is gone: on this host, whether its pid is dead (a live runner may be waiting
    minutes for the measurement lock); on another host, whether it has been silent for longer than the lease."""
    if not job.claimed_by:
        return True
    host, _, rest = job.claimed_by.partition(":")
    pid = rest.partition(":")[0]
    if host == socket.gethostname() and pid.isdigit():
        return not _pid_alive(int(pid))
    return job.heartbeat_at is None or (utcnow() - job.heartbeat_at).total_seconds() > lease_s


def configured_backend(settings: Settings) -> Backend:
    """The settings' backend with the thread count and optimisation level passed to whichever keyword it takes."""
    parameters = inspect.signature(backend_class(settings.backend).__init__).parameters
    options: dict[str, Any] = {}
    for keyword in _THREAD_KEYWORDS:
        if keyword in parameters:
            options[keyword] = settings.threads
            break
    for keyword in _OPT_LEVEL_KEYWORDS:
        if keyword in parameters:
            options[keyword] = settings.opt_level
    return create_backend(settings.backend, **options)


def measurement_environment(backend: Backend, config: MeasurementConfig) -> dict[str, Any]:
    """Everything a number depends on, stored with it: runtime settings, host facts and the protocol."""
    protocol = {name: getattr(config, name) for name in config.__dataclass_fields__}
    protocol["cores"] = list(config.cores) if config.cores else None
    return {**backend.environment(), "host": host_environment(), "protocol": protocol}


class MeasuringSession:
    """A backend, its per-call overhead (measured once) and the protocol, shared by everything that measures."""

    def __init__(self, settings: Settings, backend_factory: Callable[[Settings], Backend] = configured_backend) -> None:
        self.settings = settings
        self.config = settings.measurement_config()
        MEASUREMENT_LOCK.configure(settings.measure_lock_path)
        self._backend_factory = backend_factory
        self._backend: Backend | None = None
        self._overhead_ms: float | None = None
        self._gate: ClockGate | None = None
        self._init_lock = threading.Lock()

    @property
    def backend(self) -> Backend:
        with self._init_lock:
            if self._backend is None:
                self._backend = self._backend_factory(self.settings)
            return self._backend

    def gate(self) -> ClockGate | None:
        """The reference-kernel gate, built (and calibrated, ~0.4 s) on first use; call with MEASUREMENT_LOCK held."""
        if self.settings.clock_gate and self._gate is None:
            self._gate = ClockGate.for_backend(self.backend, tolerance=self.settings.clock_tolerance)
        return self._gate

    def overhead_ms(self) -> float:
        """The empty model's time; call with MEASUREMENT_LOCK held."""
        if self._overhead_ms is None:
            self._overhead_ms = measure_overhead(self.backend, self.config, gate=self.gate())
        return self._overhead_ms

    def environment(self) -> dict[str, Any]:
        environment = measurement_environment(self.backend, self.config)
        gate = self._gate
        environment["protocol"]["clock_gate"] = (
            {"tolerance": gate.tolerance, "reference_nominal_ms": gate.nominal_s * 1e3} if gate is not None else None
        )
        return environment


def run_job(
    *,
    job_id: int,
    device_id: str,
    session_factory: sessionmaker[Session],
    measuring: MeasuringSession,
    should_stop: Callable[[], bool] = lambda: False,
    on_progress: ProgressCallback | None = None,
) -> Job:
    """Measure the pending items of a claimed job in order; returns the job as it stands when this stops.

    Stops early, leaving the job resumable, when ``should_stop()`` turns true; stops for good when the job is
    cancelled.  A variant that fails is counted in ``failed`` and the job goes on.
    """
    grid_started = time.monotonic()
    with transaction(session_factory) as session:
        job = job_store.get_job(session=session, job_id=job_id)
        force = job.force
        items = [(item.position, item.variant_key) for item in job_store.pending_items(session=session, job_id=job_id)]
        spec_by_key = {key: store.variant_spec(session=session, variant_key=key) for key in {key for _, key in items}}
    environment = measuring.environment()
    for position, key in items:
        if should_stop():
            break
        with transaction(session_factory) as session:
            if job_store.job_status(session=session, job_id=job_id) == "cancelled":
                break
            skip = not force and store.has_measurement(session=session, device_id=device_id, variant_key=key)
            if skip:
                job = job_store.mark_item(session=session, job_id=job_id, position=position, status="skipped")
        if not skip:
            job = _measure_item(
                job_id=job_id,
                position=position,
                variant_key=key,
                spec=spec_by_key[key],
                device_id=device_id,
                session_factory=session_factory,
                measuring=measuring,
                environment=environment,
            )
        if on_progress is not None:
            on_progress(job)
    with transaction(session_factory) as session:
        job = job_store.get_job(session=session, job_id=job_id)
        grid_finished = job.status == "running" and job.done + job.failed >= job.total
        in_context = grid_finished and job.preset == "standard" and measuring.backend.name == "onnxruntime"
    if in_context and not should_stop():
        # The standard preset's second half (issue 3): kernels profiled inside generated networks, so whole-model
        # predictions see the runtime's fusions and layout.  A crash here leaves the job running; resume redoes it.
        try:
            _profile_in_context(
                device_id=device_id,
                session_factory=session_factory,
                measuring=measuring,
                grid_elapsed_s=time.monotonic() - grid_started,
            )
        except Exception as exc:  # the operator grid is stored; the job reports what failed after it
            logger.warning("job %s: in-context profiling failed: %s", job_id, exc)
            _fail_job(session_factory, job_id, RuntimeError(f"in-context kernel profiling: {exc}"))
    elif in_context:
        return job
    with transaction(session_factory) as session:
        job = job_store.get_job(session=session, job_id=job_id)
        if job.status == "running" and job.done + job.failed >= job.total:
            if job.total and job.failed == job.total:
                first_error = job_store.first_item_error(session=session, job_id=job_id)
                job = job_store.finish_job(
                    session=session,
                    job_id=job_id,
                    status="failed",
                    error=f"all {job.total} variants failed; first: {first_error}",
                )
            else:
                job = job_store.finish_job(session=session, job_id=job_id, status="done")
        return job


def _measure_item(
    *,
    job_id: int,
    position: int,
    variant_key: str,
    spec: dict[str, Any],
    device_id: str,
    session_factory: sessionmaker[Session],
    measuring: MeasuringSession,
    environment: dict[str, Any],
) -> Job:
    try:
        op = op_from_dict(spec, max_elements=measuring.settings.max_elements)
        with MEASUREMENT_LOCK:
            overhead_ms = measuring.overhead_ms()
            started_at = utcnow()
            measured = measure_sessions(
                lambda: measuring.backend.prepare_op(op),
                measuring.config,
                overhead_ms=overhead_ms,
                gate=measuring.gate(),
            )
            stats = measured.stats
            # Per-variant facts a backend learns while building (Edge TPU ops mapped, TensorRT engine build time).
            details = measured.details
            finished_at = utcnow()
    except Exception as exc:  # any runtime error of one variant is that variant's failure, not the job's
        logger.warning("job %s: variant %s failed: %s", job_id, variant_key, exc)
        with transaction(session_factory) as session:
            return job_store.mark_item(
                session=session, job_id=job_id, position=position, status="failed", error=f"{type(exc).__name__}: {exc}"
            )
    with transaction(session_factory) as session:
        store.add_measurement(
            session=session,
            device_id=device_id,
            variant_key=variant_key,
            stats=stats,
            environment={**environment, **details} if details else environment,
            job_id=job_id,
            started_at=started_at,
            measured_at=finished_at,
        )
        return job_store.mark_item(session=session, job_id=job_id, position=position, status="done")


def _profile_in_context(
    *, device_id: str, session_factory: sessionmaker[Session], measuring: MeasuringSession, grid_elapsed_s: float
) -> None:
    from latency_service.kernel_profiling import in_context_budget
    from latency_service.model_latency import run_in_context_profiling

    # A configured budget is used as it is; the default shares the preset's 20 minutes with the grid just run.
    budget = measuring.settings.kernel_budget_s
    if budget is None:
        budget = in_context_budget(grid_elapsed_s)
        logger.info("in-context profiling: %.0f s after a %.0f s operator grid", budget, grid_elapsed_s)
    run_in_context_profiling(
        session_factory=session_factory,
        measuring=measuring,
        device_id=device_id,
        device_class=measuring.settings.resolved_device_class,
        lock=MEASUREMENT_LOCK,
        budget_s=budget,
    )


def _fail_job(session_factory: sessionmaker[Session], job_id: int, exc: Exception) -> None:
    with transaction(session_factory) as session:
        job_store.finish_job(session=session, job_id=job_id, status="failed", error=f"{type(exc).__name__}: {exc}")


class JobWorker:
    """The single background thread of a service process that runs its device's jobs, oldest first."""

    def __init__(self, *, device_id: str, session_factory: sessionmaker[Session], measuring: MeasuringSession) -> None:
        self.device_id = device_id
        self.session_factory = session_factory
        self.measuring = measuring
        self.worker_id = new_worker_id()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name=f"job-worker-{self.device_id}", daemon=True)
        self._thread.start()

    def notify(self) -> None:
        """A job was queued: look now instead of at the next poll."""
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the current variant; the job stays ``running`` and resumes at the next start."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        poll = self.measuring.settings.poll_interval_s
        while not self._stop.is_set():
            self._wake.clear()
            try:
                ran = self._run_next()
            except Exception:  # the worker must outlive a broken database connection or a bug in one job
                logger.exception("job worker: unexpected error")
                ran = False
            if not ran:
                self._wake.wait(poll)

    def _run_next(self) -> bool:
        with transaction(self.session_factory) as session:
            job = job_store.claim_next_job(
                session=session, device_id=self.device_id, worker_id=self.worker_id, is_abandoned=job_abandoned
            )
            job_id = job.id if job is not None else None
        if job_id is None:
            return False
        try:
            job = run_job(
                job_id=job_id,
                device_id=self.device_id,
                session_factory=self.session_factory,
                measuring=self.measuring,
                should_stop=self._stop.is_set,
            )
            if job.status == "running":
                # Stopped half-way (shutdown): hand the lease back so the next worker resumes without waiting.
                with transaction(self.session_factory) as session:
                    job_store.release_job(session=session, job_id=job_id)
        except Exception as exc:  # e.g. the backend cannot be created: the job fails with the reason
            logger.exception("job %s failed", job_id)
            _fail_job(self.session_factory, job_id, exc)
        return True


def run_job_inline(
    *,
    job_id: int,
    device_id: str,
    session_factory: sessionmaker[Session],
    measuring: MeasuringSession,
    worker_id: str | None = None,
    show_progress: bool = True,
) -> Job:
    """Run one job in this thread with a rich progress bar (the CLI's local ``profile``).

    Create the job with ``job_store.create_job(claimed_by=worker_id)`` so that no service worker on the same store takes
    it first; a queued job is claimed here.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with transaction(session_factory) as session:
        job = job_store.get_job(session=session, job_id=job_id)
        if job.status == "queued":
            job.status, job.claimed_by = "running", worker_id or new_worker_id()
            job.started_at = job.heartbeat_at = utcnow()
        total, already = job.total, job.done + job.failed
    columns = (
        TextColumn("[bold]profiling"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("failed {task.fields[failed]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, disable=not show_progress, transient=False) as progress:
        task = progress.add_task("profile", total=total, completed=already, failed=0)

        def update(job: Job) -> None:
            progress.update(task, completed=job.done + job.failed, failed=job.failed)

        try:
            return run_job(
                job_id=job_id,
                device_id=device_id,
                session_factory=session_factory,
                measuring=measuring,
                on_progress=update,
            )
        except Exception as exc:
            _fail_job(session_factory, job_id, exc)
            raise
