"""The ``latency-service`` CLI: local profile / fit / predict, and exit code 2 with one line for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from latency_helpers import tiny_ops
from sqlalchemy import func, inspect, select
from typer.testing import CliRunner

from latency_service.cli import app
from latency_service.db import make_engine
from latency_service.models import Job, Variant

runner = CliRunner()


def write_ops(path: Path, ops: object) -> Path:
    path.write_text(json.dumps(ops))
    return path


def count_rows(db_url: str, model: type[Job] | type[Variant]) -> int:
    engine = make_engine(db_url)
    try:
        if not inspect(engine).has_table(model.__tablename__):
            return 0
        with engine.connect() as connection:
            return connection.execute(select(func.count()).select_from(model)).scalar() or 0
    finally:
        engine.dispose()


def test_profile_fit_predict_locally(fast_env: dict[str, str], sqlite_url: str, tmp_path: Path) -> None:
    ops_file = write_ops(tmp_path / "ops.json", {"ops": tiny_ops(4)})
    profiled = runner.invoke(app, ["profile", "--ops", str(ops_file), "--db", sqlite_url])
    assert profiled.exit_code == 0, profiled.output
    assert "4 done (0 measured before), 0 failed of 4" in profiled.output
    again = runner.invoke(app, ["profile", "--ops", str(ops_file), "--db", sqlite_url])
    assert again.exit_code == 0 and "4 done (4 measured before)" in again.output
    fitted = runner.invoke(app, ["fit", "--db", sqlite_url])
    assert fitted.exit_code == 0, fitted.output
    assert "conv2d" in fitted.output and "relu" in fitted.output
    predicted = runner.invoke(app, ["predict", "--ops", str(ops_file), "--db", sqlite_url])
    assert predicted.exit_code == 0, predicted.output
    assert predicted.output.count("measured") == 4 and "total" in predicted.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["profile"], "exactly one of --preset and --ops"),
        (["profile", "--preset", "enormous"], "preset: unknown preset 'enormous'"),
        (["profile", "--ops", "missing.json"], "ops: cannot read missing.json"),
        (["profile", "--ops", "{bad}"], "is not valid JSON"),
        (["profile", "--ops", "{spec}"], "ops[1].cin: must be positive"),
        (["profile", "--ops", "{empty}"], "must hold a non-empty JSON list"),
        (["profile", "--preset", "smoke", "--threads", "0"], "threads:"),
        (["profile", "--preset", "smoke", "--backend", "nosuch"], "backend: unknown backend 'nosuch'"),
        (["predict", "--ops", "{spec}"], "ops[1].cin: must be positive"),
        (["serve", "--host", "0.0.0.0"], "not a loopback address"),
        (["serve", "--backend", "tensorrt"], "backend:"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(
    fast_env: dict[str, str], sqlite_url: str, tmp_path: Path, args: list[str], message: str
) -> None:
    files = {
        "{bad}": tmp_path / "bad.json",
        "{spec}": write_ops(
            tmp_path / "spec.json", [{"op": "relu", "c": 4, "hw": 4}, {"op": "linear", "cin": 0, "cout": 4}]
        ),
        "{empty}": write_ops(tmp_path / "empty.json", []),
    }
    files["{bad}"].write_text("[{")
    argv = [str(files.get(arg, arg)) for arg in args]
    result = runner.invoke(app, [*argv, "--db", sqlite_url] if args[0] != "serve" else argv)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert count_rows(sqlite_url, Job) == 0 and count_rows(sqlite_url, Variant) == 0


def test_predict_before_fit_and_db_upgrade(fast_env: dict[str, str], sqlite_url: str, tmp_path: Path) -> None:
    upgraded = runner.invoke(app, ["db", "upgrade", "--db", sqlite_url])
    assert upgraded.exit_code == 0 and "schema at head" in upgraded.output
    ops_file = write_ops(tmp_path / "ops.json", tiny_ops(2))
    result = runner.invoke(app, ["predict", "--ops", str(ops_file), "--db", sqlite_url])
    assert result.exit_code == 1 and "latency-service fit" in result.stderr


def test_module_entry_point_exit_code_without_traceback(fast_env: dict[str, str]) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "latency_service", "serve", "--host", "10.1.2.3", "--port", "9"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 2
    assert "Traceback" not in completed.stderr
    assert completed.stderr.strip().startswith("error: host: ") or "not a loopback" in completed.stderr
