"""Fixtures for the latency-service tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from latency_helpers import FAST_MEASUREMENT_ENV, ServiceProcess


@pytest.fixture
def fast_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, str]:
    """FIGS_* variables for fast measurement, isolated from the developer's own settings and data."""
    for name in list(os.environ):
        if name.startswith("FIGS_"):
            monkeypatch.delenv(name)
    env = {
        **FAST_MEASUREMENT_ENV,
        "FIGS_DATA_DIR": str(tmp_path / "data"),
        "FIGS_DEVICE_ID": "test-device",
        # The test's own host-wide lock: its processes still take turns, but never wait for a benchmark next door.
        "FIGS_MEASURE_LOCK_PATH": str(tmp_path / "measure.lock"),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def service_factory(fast_env: dict[str, str], tmp_path: Path) -> Iterator[Any]:
    """Build services sharing this test's data dir; every one started is stopped at the end."""
    started: list[ServiceProcess] = []

    def make(**env: str) -> ServiceProcess:
        service = ServiceProcess(env={**fast_env, **env}, log_path=tmp_path / f"service{len(started)}.log")
        started.append(service)
        return service

    yield make
    for service in started:
        service.stop()
