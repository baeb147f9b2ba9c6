"""The job worker with real onnxruntime timings on tiny variants."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from latency_service import job_store, store
from latency_service.backends import Backend
from latency_service.config import Settings
from latency_service.db import make_engine, make_session_factory, migrate, transaction
from latency_service.jobs import (
    JobWorker,
    MeasuringSession,
    configured_backend,
    job_abandoned,
    new_worker_id,
    run_job,
    run_job_inline,
)
from latency_service.measurement_lock import MEASUREMENT_LOCK
from latency_service.models import Job, Measurement
from predictors.ops import Conv2d, OpSpec, op_from_dict

DEVICE = "test-device"


def relu(c: int, hw: int) -> OpSpec:
    # The activation classes are generated at import time, so type checkers cannot see their fields.
    return op_from_dict({"op": "relu", "c": c, "hw": hw})


@pytest.fixture
def settings(fast_env: dict[str, str]) -> Settings:
    return Settings()


@pytest.fixture
def factory(settings: Settings) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(settings.database_url)
    migrate(settings.database_url, engine=engine)
    factory = make_session_factory(engine)
    with transaction(factory) as session:
        store.upsert_device(
            session=session, device_id=DEVICE, device_class="c", backend="onnxruntime", backend_version="x", host={}
        )
    yield factory
    engine.dispose()


def make_job(factory: sessionmaker[Session], ops: list[OpSpec], force: bool = False) -> int:
    with transaction(factory) as session:
        return job_store.create_job(session=session, device_id=DEVICE, ops=ops, force=force).id


def measurements(factory: sessionmaker[Session]) -> list[Measurement]:
    with transaction(factory) as session:
        return list(session.scalars(select(Measurement).order_by(Measurement.id)))


OPS: list[OpSpec] = [Conv2d(cin=4, cout=8, hw=8), relu(8, 8), Conv2d(cin=8, cout=4, hw=8, k=1)]


def test_inline_job_measures_each_variant_once_and_skips_measured(
    settings: Settings, factory: sessionmaker[Session]
) -> None:
    measuring = MeasuringSession(settings)
    job = run_job_inline(
        job_id=make_job(factory, OPS),
        device_id=DEVICE,
        session_factory=factory,
        measuring=measuring,
        show_progress=False,
    )
    assert (job.status, job.done, job.failed, job.total) == ("done", 3, 0, 3)
    rows = measurements(factory)
    assert sorted(r.variant_key for r in rows) == sorted(op.key for op in OPS)
    for row in rows:
        assert 0 < row.p10_ms <= row.median_ms <= row.p90_ms
        assert row.n >= 5 and row.overhead_ms is not None and row.overhead_ms > 0
        assert row.environment["runtime"] == "onnxruntime" and row.environment["intra_op_threads"] == 1
        assert row.environment["host"]["cpu_model"]
        assert row.started_at is not None and row.started_at <= row.measured_at
    # Measured already: a second job skips them all; with force it measures them again.
    again = run_job_inline(
        job_id=make_job(factory, OPS),
        device_id=DEVICE,
        session_factory=factory,
        measuring=measuring,
        show_progress=False,
    )
    assert (again.status, again.done) == ("done", 3)
    assert len(measurements(factory)) == 3
    forced = run_job_inline(
        job_id=make_job(factory, OPS[:1], force=True),
        device_id=DEVICE,
        session_factory=factory,
        measuring=measuring,
        show_progress=False,
    )
    assert forced.done == 1
    assert len(measurements(factory)) == 4


class FailingOnRelu:
    """A real onnxruntime backend whose relu variants fail to build: failures must count, not kill the job."""

    def __init__(self, settings: Settings) -> None:
        self.inner = configured_backend(settings)

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def prepare_op(self, op: OpSpec) -> object:
        if op.kind == "relu":
            raise RuntimeError("relu kernels are broken on this device")
        return self.inner.prepare_op(op)


def test_failed_variants_are_counted_and_the_job_goes_on(settings: Settings, factory: sessionmaker[Session]) -> None:
    measuring = MeasuringSession(settings, backend_factory=lambda s: FailingOnRelu(s))  # type: ignore[arg-type,return-value]
    job = run_job_inline(
        job_id=make_job(factory, OPS),
        device_id=DEVICE,
        session_factory=factory,
        measuring=measuring,
        show_progress=False,
    )
    assert (job.status, job.done, job.failed) == ("done", 2, 1)
    with transaction(factory) as session:
        assert "relu kernels are broken" in (job_store.first_item_error(session=session, job_id=job.id) or "")
    only_relu = run_job_inline(
        job_id=make_job(factory, [relu(3, 3)]),
        device_id=DEVICE,
        session_factory=factory,
        measuring=measuring,
        show_progress=False,
    )
    assert only_relu.status == "failed" and "all 1 variants failed" in (only_relu.error or "")


def test_stopped_job_resumes_without_remeasuring(settings: Settings, factory: sessionmaker[Session]) -> None:
    measuring = MeasuringSession(settings)
    job_id = make_job(factory, OPS)
    crashed = f"{socket.gethostname()}:999999999:dead"  # a runner process that no longer exists
    with transaction(factory) as session:
        job_store.claim_next_job(session=session, device_id=DEVICE, worker_id=crashed, is_abandoned=job_abandoned)
    stop_after_first = iter([False, True])
    job = run_job(
        job_id=job_id,
        device_id=DEVICE,
        session_factory=factory,
        measuring=measuring,
        should_stop=lambda: next(stop_after_first, True),
    )
    assert (job.status, job.done) == ("running", 1)
    worker = JobWorker(device_id=DEVICE, session_factory=factory, measuring=measuring)
    worker.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with transaction(factory) as session:
                if job_store.job_status(session=session, job_id=job_id) == "done":
                    break
            time.sleep(0.05)
    finally:
        worker.stop()
    keys = [r.variant_key for r in measurements(factory)]
    assert sorted(keys) == sorted(op.key for op in OPS)  # each exactly once


def test_cancel_stops_before_the_next_variant(settings: Settings, factory: sessionmaker[Session]) -> None:
    measuring = MeasuringSession(settings)
    job_id = make_job(factory, [Conv2d(cin=4, cout=c, hw=8) for c in range(1, 40)])
    with transaction(factory) as session:
        job_store.claim_next_job(session=session, device_id=DEVICE, worker_id="test", is_abandoned=job_abandoned)

    def cancel_after_two(job: object) -> None:
        if getattr(job, "done", 0) == 2:
            with transaction(factory) as session:
                job_store.cancel_job(session=session, job_id=job_id)

    job = run_job(
        job_id=job_id, device_id=DEVICE, session_factory=factory, measuring=measuring, on_progress=cancel_after_two
    )
    assert job.status == "cancelled" and job.done == 2
    assert len(measurements(factory)) == 2


def test_job_fails_with_the_reason_when_the_backend_is_missing(fast_env: dict[str, str], tmp_path: Path) -> None:
    def missing(_settings: Settings) -> Backend:
        from latency_service.backends import BackendUnavailable

        raise BackendUnavailable("tensorrt: libnvinfer.so.10 not found")

    settings = Settings()
    engine = make_engine(settings.database_url)
    migrate(settings.database_url, engine=engine)
    factory = make_session_factory(engine)
    with transaction(factory) as session:
        store.upsert_device(
            session=session, device_id=DEVICE, device_class="c", backend="tensorrt", backend_version="-", host={}
        )
    job_id = make_job(factory, OPS)
    worker = JobWorker(device_id=DEVICE, session_factory=factory, measuring=MeasuringSession(settings, missing))
    worker.start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with transaction(factory) as session:
                job = job_store.job_progress(session=session, job_id=job_id)
            if job.status == "failed":
                break
            time.sleep(0.05)
    finally:
        worker.stop()
        engine.dispose()
    assert job.status == "failed" and "libnvinfer" in (job.error or "")


def test_job_abandoned_follows_the_runner_process(settings: Settings, factory: sessionmaker[Session]) -> None:
    with transaction(factory) as session:
        mine = job_store.create_job(session=session, device_id=DEVICE, ops=OPS[:1], claimed_by=new_worker_id())
        assert not job_abandoned(mine)  # this very process, alive, fresh heartbeat
        host, _, _ = mine.claimed_by.partition(":") if mine.claimed_by else ("", "", "")
        dead = job_store.create_job(session=session, device_id=DEVICE, ops=OPS[:1], claimed_by=f"{host}:999999999:abcd")
        assert job_abandoned(dead)
        remote = job_store.create_job(session=session, device_id=DEVICE, ops=OPS[:1], claimed_by="elsewhere:1:abcd")
        assert not job_abandoned(remote)
        assert job_abandoned(remote, lease_s=-1)  # a remote runner is judged by its heartbeat alone


def test_measurement_lock_excludes_other_processes(settings: Settings, tmp_path: Path) -> None:
    import subprocess
    import sys

    lock_path = tmp_path / "measure.lock"
    MEASUREMENT_LOCK.configure(str(lock_path))
    holder = (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
        "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(1.0)"
    )
    process = subprocess.Popen([sys.executable, "-c", holder, str(lock_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == "held"
        start = time.monotonic()
        with MEASUREMENT_LOCK:
            waited = time.monotonic() - start
    finally:
        process.wait(10)
        MEASUREMENT_LOCK.configure(settings.measure_lock_path)
    assert waited > 0.5, "the lock did not wait for the other process"


def wait_until(condition: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_graceful_stop_hands_the_job_to_the_next_worker(settings: Settings, factory: sessionmaker[Session]) -> None:
    ops: list[OpSpec] = [Conv2d(cin=4, cout=c, hw=8) for c in range(1, 25)]
    job_id = make_job(factory, ops)

    def progress() -> Job:
        with transaction(factory) as session:
            return job_store.job_progress(session=session, job_id=job_id)

    first = JobWorker(device_id=DEVICE, session_factory=factory, measuring=MeasuringSession(settings))
    first.start()
    wait_until(lambda: progress().done >= 2)
    first.stop()
    stopped = progress()
    assert stopped.status == "running" and stopped.claimed_by is None and stopped.done < len(ops)

    second = JobWorker(device_id=DEVICE, session_factory=factory, measuring=MeasuringSession(settings))
    second.start()
    try:
        wait_until(lambda: progress().status == "done")
    finally:
        second.stop()
    keys = [row.variant_key for row in measurements(factory)]
    assert len(keys) == len(ops) == len(set(keys))


def test_standard_preset_job_profiles_kernels_in_context_after_its_grid(
    fast_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from latency_service.kernel_models import KernelPredictorRow

    monkeypatch.setenv("FIGS_KERNEL_BUDGET_S", "3")
    settings = Settings()
    engine = make_engine(settings.database_url)
    migrate(settings.database_url, engine=engine)
    factory = make_session_factory(engine)
    with transaction(factory) as session:
        store.upsert_device(
            session=session, device_id=DEVICE, device_class="c", backend="onnxruntime", backend_version="x", host={}
        )
        # A short grid labelled `standard`: the in-context half must follow it whatever the grid's length.
        standard = job_store.create_job(session=session, device_id=DEVICE, ops=OPS[:1], preset="standard").id
        explicit = job_store.create_job(session=session, device_id=DEVICE, ops=OPS[1:2]).id
    measuring = MeasuringSession(settings)
    fitted_after: dict[int, int] = {}
    for _ in range(2):
        with transaction(factory) as session:
            claimed = job_store.claim_next_job(
                session=session, device_id=DEVICE, worker_id="w", is_abandoned=lambda j: False
            )
            assert claimed is not None
            job_id = claimed.id
        job = run_job(job_id=job_id, device_id=DEVICE, session_factory=factory, measuring=measuring)
        assert job.status == "done", job.error
        with transaction(factory) as session:
            fitted_after[job_id] = len(session.scalars(select(KernelPredictorRow)).all())
    # Only the standard job fits a whole-model (kernel) predictor: it ran first (oldest job first).
    assert fitted_after == {standard: 1, explicit: 1}
    engine.dispose()
