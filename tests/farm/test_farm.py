"""`figs farm` against three real `latency-service serve` processes on loopback ports, one SIGKILLed mid-job.

The three services start once for the module (about 10 s on two cores); the kill test comes last in the file and
works on variants the earlier tests never sent.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from typer.testing import CliRunner

from predictors.ops import OpSpec, op_from_dict
from search.farm import Assignment, Service, farm_app, probe, shard_and_wait

if TYPE_CHECKING:
    from conftest import PostgresServer

TOKEN = "farm-test-token"
# The victim times each variant for VICTIM_MIN_TIME_S, long against the 0.2-2 s a busy service takes to answer, so
# that the client's view of its store catches up between two of its commits; the others are quick.
VICTIM_MIN_TIME_S = 3.0
MIN_TIME_S = 0.2
POLL_S = 0.1
GRID = [
    {"op": "conv2d", "cin": c, "cout": c * 2, "hw": 8, "k": k, "act": "relu"} for c in (4, 8, 12) for k in (1, 3)
] + [{"op": kind, "c": c, "hw": 8} for kind in ("relu", "add", "global_avgpool") for c in (4, 8)]
CLI_GRID = [{"op": "relu6", "c": 4, "hw": 6}, {"op": "sigmoid", "c": 4, "hw": 6}]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RunningService:
    url: str
    db_path: Path
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-5:])


def _start(
    tmp: Path, name: str, min_time_s: float = MIN_TIME_S, *, db_url: str | None = None, device_class: str = ""
) -> RunningService:
    port = _free_port()
    db_path = tmp / f"{name}.db"
    env = {
        **os.environ,
        "FIGS_DEVICE_ID": f"farm-{name}",
        "FIGS_DEVICE_CLASS": device_class or "farm-test-cpu",
        "FIGS_MIN_TIME_S": str(min_time_s),
        "FIGS_MAX_TIME_S": str(min_time_s + 0.2),
        "FIGS_WARMUP_S": "0.02",
        "FIGS_MAX_ATTEMPTS": "1",
        # The run-count cap would otherwise end the timing of a 10 us kernel long before MIN_TIME_S.
        "FIGS_MAX_RUNS": "100000000",
    }
    command = [sys.executable, "-m", "latency_service", "serve", "--backend", "onnxruntime", "--port", str(port)]
    command += [
        "--db",
        db_url or f"sqlite:///{db_path}",
        "--token",
        TOKEN,
        "--data-dir",
        str(tmp / name),
        "--log-level",
        "warning",
    ]
    log_path = tmp / f"{name}.log"
    process = subprocess.Popen(command, env=env, stdout=log_path.open("wb"), stderr=subprocess.STDOUT)
    return RunningService(url=f"http://127.0.0.1:{port}", db_path=db_path, process=process, log_path=log_path)


def _wait_healthy(service: RunningService, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            raise RuntimeError(f"{service.url} exited with {service.process.returncode}:\n{service.log_tail()}")
        try:
            if httpx.get(f"{service.url}/v1/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{service.url} not healthy after {timeout_s} s")


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RunningService]]:
    tmp_path = tmp_path_factory.mktemp("farm")
    services = [_start(tmp_path, "a", VICTIM_MIN_TIME_S), _start(tmp_path, "b"), _start(tmp_path, "c")]
    try:
        for service in services:
            _wait_healthy(service)
        yield services
    finally:
        for service in services:
            if service.process.poll() is None:
                service.process.send_signal(signal.SIGTERM)
        for service in services:
            try:
                service.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                service.process.kill()


def _keys_on(service: RunningService) -> list[str]:
    response = httpx.get(
        f"{service.url}/v1/measurements", params={"limit": 1000}, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    response.raise_for_status()
    return [item["key"] for item in response.json()["items"]]


def _keys_in_db(path: Path, device_id: str) -> list[str]:
    with sqlite3.connect(path) as connection:
        rows = connection.execute("SELECT variant_key FROM measurements WHERE device_id = ?", (device_id,))
        return [row[0] for row in rows]


def test_cli_lists_services_and_names_the_dead_one(farm: list[RunningService], tmp_path: Path) -> None:
    farm_file = tmp_path / "farm.json"
    dead_url = f"http://127.0.0.1:{_free_port()}"
    devices = [{"url": s.url} for s in farm] + [dead_url, {"url": farm[0].url, "token": "wrong"}]
    farm_file.write_text(json.dumps({"token": TOKEN, "devices": devices}))
    result = CliRunner().invoke(farm_app, ["list", "--file", str(farm_file)], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert result.output.count("farm-test-cpu") == 3
    assert "onnxruntime" in result.output and "unreachable" in result.output
    assert "HTTP 401 on /v1/device (check --token" in result.output


def test_cli_profile_tallies_what_was_measured_where(farm: list[RunningService], tmp_path: Path) -> None:
    # Only the two quick services: the first one is the slow victim of the last test.
    ops_file, report = tmp_path / "ops.json", tmp_path / "report.json"
    ops_file.write_text(json.dumps(CLI_GRID))
    args = ["profile", "--class", "farm-test-cpu", "--ops", str(ops_file), "--poll-s", "0.1", "--report", str(report)]
    args += [arg for s in farm[1:] for arg in ("--device", s.url)]
    result = CliRunner().invoke(farm_app, args, env={"FIGS_TOKEN": TOKEN, "COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    tally = json.loads(report.read_text())
    assert tally["total"] == 2 and tally["down"] == [] and tally["unmeasured"] == []
    assert sorted(len(keys) for keys in tally["measured_by"].values()) == [1, 1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["profile", "--device", "http://127.0.0.1:9"], "exactly one of --preset and --ops"),
        (["list"], "--file FARM.yaml or at least one --device"),
        (["list", "--device", "ftp://x"], "device[0]: must be an http(s) URL"),
    ],
)
def test_cli_bad_input_exits_2_naming_the_field(args: list[str], message: str) -> None:
    result = CliRunner().invoke(farm_app, args)
    assert result.exit_code == 2
    assert message in result.output


def test_cli_names_the_bad_op_before_contacting_any_service(tmp_path: Path) -> None:
    ops_file = tmp_path / "ops.json"
    ops_file.write_text(json.dumps([GRID[0], {"op": "conv2d", "cin": 0, "cout": 4, "hw": 8}]))
    result = CliRunner().invoke(farm_app, ["profile", "--device", "http://127.0.0.1:9", "--ops", str(ops_file)])
    assert result.exit_code == 2
    assert "ops[1].cin: must be positive" in result.output


def test_cli_exits_3_when_no_service_answers(tmp_path: Path) -> None:
    ops_file = tmp_path / "ops.json"
    ops_file.write_text(json.dumps(GRID[:1]))
    result = CliRunner().invoke(
        farm_app, ["profile", "--device", f"http://127.0.0.1:{_free_port()}", "--ops", str(ops_file)]
    )
    assert result.exit_code == 3
    assert "no service answered" in result.output


def test_farm_file_yaml_with_token_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("yaml", reason="PyYAML is not installed")
    from search.farm import read_farm_file

    monkeypatch.setenv("FARM_TEST_TOKEN", "from-env")
    farm_file = tmp_path / "farm.yaml"
    farm_file.write_text(
        "token: ${FARM_TEST_TOKEN}\ndevices:\n  - url: http://10.0.0.1:8401\n"
        "  - {url: http://10.0.0.2:8401, token: own}\n  - http://10.0.0.3:8402\n"
    )
    services = read_farm_file(farm_file, default_token=None)
    assert [(s.url, s.token) for s in services] == [
        ("http://10.0.0.1:8401", "from-env"),
        ("http://10.0.0.2:8401", "own"),
        ("http://10.0.0.3:8402", "from-env"),
    ]
    farm_file.write_text("devices:\n  - url: 10.0.0.1:8401\n")
    with pytest.raises(ValueError, match=r"^devices\[0\]\.url: must be an http"):
        read_farm_file(farm_file, default_token=None)


@pytest.mark.slow
@pytest.mark.postgres
def test_shared_postgres_store_fits_per_class_from_every_device(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    """Two devices of one class write to one PostgreSQL store; a fit on either uses both devices' measurements."""
    url = postgres_server.fresh_database()
    services = [_start(tmp_path, name, db_url=url, device_class="farm-pg-class") for name in ("pg1", "pg2")]
    try:
        for service in services:
            _wait_healthy(service)
        members = [probe(Service(url=s.url, token=TOKEN)) for s in services]
        ops = [op_from_dict(spec) for spec in GRID[:6]]
        result = shard_and_wait(members, ops, poll_s=POLL_S, show_progress=False)
        assert sorted(len(keys) for keys in result.measured_by.values()) == [3, 3]
        headers = {"Authorization": f"Bearer {TOKEN}"}
        fit = httpx.post(f"{services[0].url}/v1/predictors/fit", headers=headers, timeout=120)
        assert fit.status_code == 200, fit.text
        assert fit.json()["samples"] == 6, fit.json()  # three measured here, three on the other device of the class
    finally:
        for service in services:
            service.process.send_signal(signal.SIGTERM)
            service.process.wait(timeout=15)


@pytest.mark.slow
def test_killed_service_share_is_reassigned_and_measured_exactly_once(farm: list[RunningService]) -> None:
    ops: list[OpSpec] = [op_from_dict(spec) for spec in GRID]
    victim = farm[0]
    members = [probe(Service(url=s.url, token=TOKEN)) for s in farm]
    assert all(m.healthy and m.device_class == "farm-test-cpu" for m in members), [m.problem for m in members]
    seen_before_kill: set[str] = set()

    def kill_mid_job(assignments: list[Assignment]) -> None:
        # Freeze the victim, and kill it only when the client's last view equals what its store holds: a commit
        # landing between that view and the kill would be measured twice, and that race is not what is tested.
        mine = next(a for a in assignments if a.service.url == victim.url)
        if victim.process.poll() is not None or not mine.measured or len(mine.measured) == len(mine.keys):
            return
        victim.process.send_signal(signal.SIGSTOP)
        if set(_keys_in_db(victim.db_path, "farm-a")) == mine.measured:
            victim.process.send_signal(signal.SIGKILL)
            victim.process.wait(timeout=10)
            seen_before_kill.update(mine.measured)
        else:
            victim.process.send_signal(signal.SIGCONT)

    result = shard_and_wait(members, ops, poll_s=POLL_S, down_after=2, observer=kill_mid_job, show_progress=False)

    assert victim.process.returncode == -signal.SIGKILL
    assert result.down == [victim.url]
    assert result.unmeasured == []
    survivors = farm[1:]
    grid_keys = {op.key for op in ops}
    counts = Counter(key for service in survivors for key in _keys_on(service) if key in grid_keys)
    counts.update(_keys_in_db(victim.db_path, "farm-a"))  # the dead one's store, read directly
    assert set(counts) == {op.key for op in ops}
    where = {s.url: _keys_on(s) for s in survivors} | {"victim-db": _keys_in_db(victim.db_path, "farm-a")}
    assert all(n == 1 for n in counts.values()), (where, seen_before_kill)
    assert set(_keys_in_db(victim.db_path, "farm-a")) == seen_before_kill == set(result.measured_by[victim.url])
    for service in survivors:
        assert sorted(set(_keys_on(service)) & grid_keys) == result.measured_by[service.url]
