"""Store functions against a migrated SQLite file and a real PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import func, inspect, select
from sqlalchemy.orm import Session, sessionmaker

from latency_service import job_store, store
from latency_service.db import make_engine, make_session_factory, migrate, transaction
from latency_service.measurement import MeasurementStats
from latency_service.models import Base, Job, JobItem, Measurement, Variant
from predictors.ops import Conv2d, Linear, OpSpec, op_from_dict


def relu(c: int, hw: int) -> OpSpec:
    # The activation classes are generated at import time, so type checkers cannot see their fields.
    return op_from_dict({"op": "relu", "c": c, "hw": hw})


def stats(median_ms: float) -> MeasurementStats:
    return MeasurementStats(
        median_ms=median_ms,
        p10_ms=median_ms * 0.9,
        p90_ms=median_ms * 1.1,
        mean_ms=median_ms,
        cv=0.01,
        n=100,
        spread=0.01,
        attempts=1,
        flagged=False,
        flag_reason=None,
        overhead_ms=0.005,
    )


@pytest.fixture
def factory(db_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(db_url)
    migrate(db_url, engine=engine)
    factory = make_session_factory(engine)
    with transaction(factory) as session:
        for device_id, device_class in (("dev-a", "class-x"), ("dev-b", "class-x"), ("dev-c", "class-y")):
            store.upsert_device(
                session=session,
                device_id=device_id,
                device_class=device_class,
                backend="onnxruntime",
                backend_version="1.0",
                host={"cpu_model": "test"},
            )
    yield factory
    engine.dispose()


def test_migration_creates_every_table_and_is_idempotent(db_url: str) -> None:
    migrate(db_url)
    migrate(db_url)  # a restart migrates again: must be a no-op
    engine = make_engine(db_url)
    try:
        tables = set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert set(Base.metadata.tables) <= tables
    assert "alembic_version" in tables


def test_migrations_match_the_orm_models(db_url: str) -> None:
    """What `alembic revision --autogenerate` would write is empty: the hand-written migrations are complete."""
    import latency_service.kernel_models  # noqa: F401  (issue 3's tables live on the same Base)

    migrate(db_url)
    engine = make_engine(db_url)
    try:
        with engine.connect() as connection:
            assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    finally:
        engine.dispose()


def test_sqlite_runs_in_wal_mode(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    try:
        with engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert (connection.exec_driver_sql("PRAGMA busy_timeout").scalar() or 0) >= 1000
    finally:
        engine.dispose()


def test_session_count_and_spread_are_stored(factory: sessionmaker[Session]) -> None:
    conv = Conv2d(cin=8, cout=16, hw=8)
    with transaction(factory) as session:
        store.get_or_create_variants(session=session, ops=[conv])
        five_sessions = MeasurementStats(**{**stats(1.0).to_dict(), "sessions": 5, "session_spread": 0.03})
        store.add_measurement(
            session=session, device_id="dev-a", variant_key=conv.key, stats=five_sessions, environment={}
        )
    with transaction(factory) as session:
        row = session.scalars(select(Measurement).where(Measurement.device_id == "dev-a")).one()
        assert (row.sessions, row.session_spread) == (5, pytest.approx(0.03))


def test_measurement_history_is_kept_and_latest_valid_wins(factory: sessionmaker[Session]) -> None:
    conv, small_relu = Conv2d(cin=8, cout=8, hw=8), relu(8, 8)
    with transaction(factory) as session:
        keys = store.get_or_create_variants(session=session, ops=[conv, small_relu, conv])
        assert keys == [conv.key, small_relu.key]
        store.add_measurement(
            session=session, device_id="dev-a", variant_key=conv.key, stats=stats(1.0), environment={}
        )
        store.add_measurement(
            session=session, device_id="dev-a", variant_key=conv.key, stats=stats(2.0), environment={}
        )
        store.add_measurement(
            session=session, device_id="dev-a", variant_key=small_relu.key, stats=stats(0.5), environment={}
        )
    with transaction(factory) as session:
        items, total = store.latest_measurements(session=session, device_id="dev-a")
        assert total == 2
        assert {item.op.key: item.measurement.median_ms for item in items} == {conv.key: 2.0, small_relu.key: 0.5}
        convs, conv_total = store.latest_measurements(session=session, device_id="dev-a", kind="conv2d")
        assert conv_total == 1 and convs[0].op == conv
        page, _ = store.latest_measurements(session=session, device_id="dev-a", limit=1, offset=1)
        assert len(page) == 1
        history = select(func.count()).where(Measurement.device_id == "dev-a", Measurement.variant_key == conv.key)
        assert session.scalar(history) == 2
        assert store.invalidate_measurements(session=session, device_id="dev-a", variant_keys=[small_relu.key]) == 1
    with transaction(factory) as session:
        assert store.measured_keys(session=session, device_id="dev-a") == {conv.key}
        assert store.measured_keys(session=session, device_id="dev-b") == set()


def test_training_samples_per_device_and_per_class(factory: sessionmaker[Session]) -> None:
    conv = Conv2d(cin=8, cout=8, hw=8)
    with transaction(factory) as session:
        store.get_or_create_variant(session=session, op=conv)
        for device_id, ms in (("dev-a", 1.0), ("dev-b", 3.0), ("dev-c", 100.0)):
            store.add_measurement(
                session=session, device_id=device_id, variant_key=conv.key, stats=stats(ms), environment={}
            )
    with transaction(factory) as session:
        assert store.training_samples(session=session, device_id="dev-a") == [(conv, 1.0)]
        # The class median pools both devices of class-x and ignores class-y.
        assert store.training_samples(session=session, device_class="class-x") == [(conv, 2.0)]
        with pytest.raises(ValueError, match="exactly one"):
            store.training_samples(session=session)


def test_create_job_dedupes_and_orders_items(factory: sessionmaker[Session]) -> None:
    ops = [Conv2d(cin=8, cout=8, hw=8), relu(8, 8), Conv2d(cin=8, cout=8, hw=8), Linear(cin=4, cout=4)]
    with transaction(factory) as session:
        job = job_store.create_job(session=session, device_id="dev-a", ops=ops, preset=None)
        job_id = job.id
    with transaction(factory) as session:
        job = job_store.job_progress(session=session, job_id=job_id)
        assert (job.status, job.total, job.done, job.failed) == ("queued", 3, 0, 0)
        items = job_store.pending_items(session=session, job_id=job_id)
        assert [item.variant_key for item in items] == [ops[0].key, ops[1].key, ops[3].key]


def test_create_job_is_all_or_nothing(factory: sessionmaker[Session]) -> None:
    def count(session: Session, model: Any) -> int:
        return session.scalar(select(func.count()).select_from(model)) or 0

    with pytest.raises(ValueError), transaction(factory) as session:
        job_store.create_job(session=session, device_id="dev-a", ops=[Conv2d(cin=8, cout=8, hw=8)])
        raise ValueError("the request failed after the job was written")
    with pytest.raises(Exception), transaction(factory) as session:  # noqa: B017 - any database error
        job_store.create_job(session=session, device_id="no-such-device", ops=[relu(8, 8)])
    with transaction(factory) as session:
        assert count(session, Job) == 0
        assert count(session, JobItem) == 0
        assert count(session, Variant) == 0


def test_claim_mark_finish_and_resume_order(factory: sessionmaker[Session]) -> None:
    ops = [Conv2d(cin=8, cout=8, hw=8), relu(8, 8)]
    with transaction(factory) as session:
        first = job_store.create_job(session=session, device_id="dev-a", ops=ops).id
        second = job_store.create_job(session=session, device_id="dev-a", ops=ops).id
        job_store.create_job(session=session, device_id="dev-b", ops=ops)
    with transaction(factory) as session:
        job = job_store.claim_next_job(
            session=session, device_id="dev-a", worker_id="w1", is_abandoned=lambda job: False
        )
        assert job is not None and job.id == first and job.status == "running" and job.claimed_by == "w1"
        job = job_store.mark_item(session=session, job_id=first, position=0, status="done")
        assert (job.done, job.failed) == (1, 0)
        # Marking an item twice (a retried commit) does not count it twice.
        job = job_store.mark_item(session=session, job_id=first, position=0, status="done")
        assert job.done == 1
        with pytest.raises(ValueError):
            job_store.mark_item(session=session, job_id=first, position=1, status="pending")
    with transaction(factory) as session:
        # After a crash the running job comes back first, with only its pending item left.
        unfinished = job_store.unfinished_jobs(session=session, device_id="dev-a")
        assert [(j.id, j.status) for j in unfinished] == [(first, "running"), (second, "queued")]
        assert [i.position for i in job_store.pending_items(session=session, job_id=first)] == [1]
        job = job_store.mark_item(session=session, job_id=first, position=1, status="failed", error="boom")
        assert (job.done, job.failed) == (1, 1)
        assert job_store.first_item_error(session=session, job_id=first) == "boom"
        job_store.finish_job(session=session, job_id=first, status="done")
    with transaction(factory) as session:
        assert job_store.job_status(session=session, job_id=first) == "done"
        cancelled = job_store.cancel_job(session=session, job_id=second)
        assert cancelled.status == "cancelled"
        assert job_store.pending_items(session=session, job_id=second) == []
        assert job_store.cancel_job(session=session, job_id=first).status == "done"
        with pytest.raises(job_store.JobNotFoundError):
            job_store.job_progress(session=session, job_id=987654)


def test_predictors_latest_per_class(factory: sessionmaker[Session]) -> None:
    with transaction(factory) as session:
        assert store.latest_predictor(session=session, device_class="class-x") is None
        store.save_predictor(
            session=session, device_id="dev-a", device_class="class-x", version="v1", payload={"a": 1}, reports=[]
        )
        store.save_predictor(
            session=session, device_id="dev-b", device_class="class-x", version="v2", payload={"a": 2}, reports=[]
        )
    with transaction(factory) as session:
        latest = store.latest_predictor(session=session, device_class="class-x")
        assert latest is not None and latest.version == "v2" and latest.payload == {"a": 2}
        assert latest.created_at.tzinfo is not None
        assert store.latest_predictor(session=session, device_class="class-y") is None


def test_model_measurements(factory: sessionmaker[Session]) -> None:
    with transaction(factory) as session:
        for ms in (1.0, 1.5):
            store.add_model_measurement(
                session=session,
                device_id="dev-a",
                model_sha256="ab" * 32,
                model_name="m.onnx",
                stats=stats(ms),
                environment={"runtime": "onnxruntime"},
            )
    with transaction(factory) as session:
        latest = store.latest_model_measurement(session=session, device_id="dev-a", model_sha256="ab" * 32)
        assert latest is not None and latest.median_ms == 1.5 and latest.model_name == "m.onnx"
        rows, total = store.list_model_measurements(session=session, device_id="dev-a")
        assert total == 2 and [r.median_ms for r in rows] == [1.5, 1.0]


def test_a_running_job_is_taken_over_only_when_its_runner_is_gone(factory: sessionmaker[Session]) -> None:
    with transaction(factory) as session:
        live = job_store.create_job(session=session, device_id="dev-a", ops=[relu(4, 4)], claimed_by="cli").id
        queued = job_store.create_job(session=session, device_id="dev-a", ops=[relu(4, 4)]).id
    with transaction(factory) as session:
        # The CLI's job is running and its runner alive: the worker takes the queued one.
        job = job_store.claim_next_job(
            session=session, device_id="dev-a", worker_id="w", is_abandoned=lambda job: False
        )
        assert job is not None and job.id == queued
    with transaction(factory) as session:
        job_store.finish_job(session=session, job_id=queued, status="done")
    with transaction(factory) as session:
        assert (
            job_store.claim_next_job(session=session, device_id="dev-a", worker_id="w", is_abandoned=lambda j: False)
            is None
        )
        job = job_store.claim_next_job(session=session, device_id="dev-a", worker_id="w", is_abandoned=lambda j: True)
        assert job is not None and job.id == live and job.claimed_by == "w"
