"""Real ``latency-service serve`` processes over HTTP: persistence across restarts, resume after SIGKILL, strictly
one measurement at a time, token and body cap on the wire."""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from latency_helpers import ServiceProcess, tiny_ops, wait_for_job
from sqlalchemy import select

from latency_service.db import make_engine, make_session_factory
from latency_service.models import Measurement

ServiceFactory = Callable[..., ServiceProcess]


def stored_measurements(db_url: str) -> list[Measurement]:
    engine = make_engine(db_url)
    try:
        with make_session_factory(engine)() as session:
            return list(session.scalars(select(Measurement).order_by(Measurement.started_at)))
    finally:
        engine.dispose()


def slow_ops(count: int) -> list[dict[str, Any]]:
    return [{"op": "conv2d", "cin": 8, "cout": c, "hw": 16, "k": 3} for c in range(1, count + 1)]


@pytest.mark.slow
def test_results_survive_a_restart(service_factory: ServiceFactory, sqlite_url: str) -> None:
    db_url = sqlite_url
    service = service_factory(FIGS_DB_URL=db_url).start()
    with service.client() as client:
        device = client.get("/v1/device").json()
        job = client.post("/v1/jobs", json={"ops": tiny_ops(4)})
        assert job.status_code == 202 and job.json()["total"] == 4 and job.json()["status"] == "queued"
        assert wait_for_job(client, job.json()["id"])["status"] == "done"
        before = client.get("/v1/measurements").json()
    service.stop()

    restarted = service_factory(FIGS_DB_URL=db_url).start()
    with restarted.client() as client:
        assert client.get("/v1/device").json()["device_id"] == device["device_id"]
        assert client.get("/v1/measurements").json() == before
        assert client.get(f"/v1/jobs/{job.json()['id']}").json()["done"] == 4
        # Already measured on this device: a new job skips every variant.
        again = client.post("/v1/jobs", json={"ops": tiny_ops(4)}).json()
        finished = wait_for_job(client, again["id"])
        assert finished["done"] == 4 and finished["skipped"] == 4
    assert len(stored_measurements(db_url)) == 4


@pytest.mark.slow
def test_job_resumes_after_sigkill_without_measuring_twice(service_factory: ServiceFactory, db_url: str) -> None:
    env = {"FIGS_DB_URL": db_url, "FIGS_MIN_TIME_S": "0.05", "FIGS_MAX_TIME_S": "0.1"}
    service = service_factory(**env).start()
    ops = slow_ops(40)
    with service.client() as client:
        job_id = client.post("/v1/jobs", json={"ops": ops}).json()["id"]
        deadline = time.monotonic() + 60
        while client.get(f"/v1/jobs/{job_id}").json()["done"] < 3:
            assert time.monotonic() < deadline, "the job never got going"
            time.sleep(0.02)
    service.kill()
    done_at_kill = len(stored_measurements(db_url))
    assert 3 <= done_at_kill < len(ops)

    restarted = service_factory(**env).start()
    with restarted.client() as client:
        job = wait_for_job(client, job_id, timeout=120)
    assert (job["status"], job["done"], job["failed"]) == ("done", len(ops), 0)
    keys = [m.variant_key for m in stored_measurements(db_url)]
    assert len(keys) == len(ops) == len(set(keys))  # every variant measured, none twice


@pytest.mark.slow
def test_concurrent_jobs_never_overlap_in_time(service_factory: ServiceFactory, sqlite_url: str) -> None:
    service = service_factory(FIGS_DB_URL=sqlite_url).start()
    job_ids: list[int] = []
    with service.client() as client:
        barrier = threading.Barrier(2)

        def submit(ops: list[dict[str, Any]]) -> None:
            with service.client() as own:
                barrier.wait()
                job_ids.append(own.post("/v1/jobs", json={"ops": ops}).json()["id"])

        threads = [
            threading.Thread(target=submit, args=(slow_ops(12),)),
            threading.Thread(target=submit, args=(tiny_ops(12),)),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(job_ids) == 2
        for job_id in job_ids:
            assert wait_for_job(client, job_id)["status"] == "done"
    rows = stored_measurements(sqlite_url)
    assert len(rows) == 24
    for earlier, later in itertools.pairwise(rows):
        assert earlier.started_at is not None and later.started_at is not None
        assert later.started_at >= earlier.measured_at, "two measurements overlapped"


@pytest.fixture
def guarded(service_factory: ServiceFactory) -> Iterator[ServiceProcess]:
    service = service_factory(FIGS_MAX_BODY_BYTES="2048")
    service.token = "farm-token"
    yield service.start()


def test_token_and_body_cap_on_the_wire(guarded: ServiceProcess) -> None:
    with guarded.client(token="") as anonymous:
        assert anonymous.get("/v1/health").json() == {"status": "ok"}
        assert anonymous.get("/v1/device").status_code == 401
        assert anonymous.post("/v1/jobs", json={"preset": "smoke"}).status_code == 401
    with guarded.client() as client:
        assert client.get("/v1/device").status_code == 200
        big = {"ops": [{"op": "relu", "c": 4, "hw": 4}] * 100}
        assert client.post("/v1/jobs", json=big).status_code == 413

        def chunks() -> Iterator[bytes]:  # no Content-Length: the cap must count the streamed bytes
            yield b'{"ops": ['
            for _ in range(200):
                yield b'{"op": "relu", "c": 4, "hw": 4},'
            yield b'{"op": "relu", "c": 4, "hw": 4}]}'

        streamed = client.post("/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"})
        assert streamed.status_code == 413
        assert client.get("/v1/jobs").json() == []
        assert httpx.get(f"{guarded.url}/v1/jobs", headers={"Authorization": "Bearer farm-token"}).status_code == 200


@pytest.mark.slow
def test_local_profile_next_to_a_running_service(
    service_factory: ServiceFactory, sqlite_url: str, tmp_path: Path
) -> None:
    """A CLI ``profile`` on the store a service uses: neither takes the other's job, and no two timings overlap."""
    from typer.testing import CliRunner

    from latency_service.cli import app

    service = service_factory(FIGS_DB_URL=sqlite_url).start()
    ops_file = tmp_path / "ops.json"
    ops_file.write_text(json.dumps(tiny_ops(6)))
    with service.client() as client:
        served = client.post("/v1/jobs", json={"ops": slow_ops(10)}).json()
        local = CliRunner().invoke(app, ["profile", "--ops", str(ops_file), "--db", sqlite_url])
        assert local.exit_code == 0, local.output
        assert wait_for_job(client, served["id"])["done"] == 10
        jobs = client.get("/v1/jobs").json()
    assert sorted(job["total"] for job in jobs) == [6, 10] and all(job["status"] == "done" for job in jobs)
    rows = stored_measurements(sqlite_url)
    assert len(rows) == 16 == len({row.variant_key for row in rows})
    for earlier, later in itertools.pairwise(rows):
        assert later.started_at is not None and later.started_at >= earlier.measured_at, "two timings overlapped"
