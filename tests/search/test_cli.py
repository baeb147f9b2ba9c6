"""`figs` end to end against a REAL latency service process, plus the CLI's bad-input contract.

The module fixture starts ``python -m latency_service serve`` on a free loopback port with a throwaway SQLite store,
profiles the blocks space's own layers at two widths (an explicit op list: faster than a preset), and fits.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from predictors.ops import OpSpec
from search.cli import app
from search.data import load_dataset
from search.export import calibrate_device
from search.service_client import DeviceService, table_layers
from search.spaces.base import SearchSpace, create_space

pytestmark = pytest.mark.timeout(300)
runner = CliRunner()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def space_ops(space: SearchSpace, fractions: tuple[float, ...]) -> list[OpSpec]:
    ops: dict[str, OpSpec] = {}
    for layer in space.latency_layers():
        cins = {max(1, round(layer.cin * f)) for f in fractions} if layer.input_gated else {layer.cin}
        couts = {max(1, round(layer.cout * f)) for f in fractions} if layer.output_gated else {layer.cout}
        for cin in cins:
            for cout in couts:
                op = layer.op_at(cin, cout)
                ops[op.key] = op
    return list(ops.values())


def digits_space(**kwargs: object) -> SearchSpace:
    return create_space("blocks", in_channels=1, num_classes=10, image_size=8, **kwargs)


class LiveService:
    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / "service.log"
        env = {**os.environ, "FIGS_MIN_TIME_S": "0.05", "FIGS_WARMUP_S": "0.02", "FIGS_DEVICE_ID": "test-cpu"}
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "latency_service", "serve", "--port", str(self.port), "--data-dir", str(tmp)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )

    def wait_healthy(self) -> None:
        probe = DeviceService(self.url, retries=0)
        deadline = time.monotonic() + 60
        while not probe.health():
            if self.process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"latency service did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveService]:
    live = LiveService(tmp_path_factory.mktemp("service"))
    try:
        live.wait_healthy()
        client = DeviceService(live.url)
        job = client.wait_job(client.submit_job(ops=space_ops(digits_space(), (0.5, 1.0))), timeout=240)
        assert job["status"] == "done" and job["failed"] == 0, job
        client.fit()
        yield live
    finally:
        live.stop()


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr("search.service_client.DEFAULT_CACHE_DIR", tmp_path / "cache")
    return tmp_path / "cache"


def reachable_target(url: str) -> float:
    """A target halfway between the narrowest and the full uniform model, as this service measures them."""
    bundle = load_dataset("digits")
    uniform = [digits_space(width_multiplier=m) for m in (0.25, 1.0)]
    calibration = calibrate_device(DeviceService(url), uniform, in_channels=1, image_size=bundle.image_size, multiple=8)
    return sum(p[1] for p in calibration.points) / 2


def test_search_export_evaluate_resume_end_to_end(service: LiveService, tmp_path: Path, cache_dir: Path) -> None:
    target = reachable_target(service.url)
    out = tmp_path / "run"
    base = ["search", "--data", "digits", "--device", service.url, "--target-latency-ms", f"{target:.5f}"]
    base += ["--max-measurements", "4", "--out", str(out)]
    result = runner.invoke(app, [*base, "--steps", "30", "--finetune-steps", "20"])
    assert result.exit_code == 0, result.output
    for name in ("arch.json", "model.onnx", "model.pt", "keep_probabilities.png", "trajectory.png", "report.json"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    (row,) = report["devices"]
    assert row["device"] == "test-cpu" and row["target_ms"] == pytest.approx(target, rel=1e-3)
    assert row["measured_ms"] > 0 and row["p10_ms"] <= row["measured_ms"] <= row["p90_ms"]
    assert row["expected_ms"] > 0
    assert report["calibration"]["test-cpu"]["scale"] > 0
    assert report["search"]["steps_done"] == 30
    assert report["refinement"] == []
    selection = report["width_selection"]
    measured = [m["index"] for m in selection["measurements"]]
    assert measured and len(measured) <= 4, "--max-measurements 4 bounds the loop"
    assert len(set(measured)) == len(measured) and selection["candidates"] > 10
    assert all(
        m["measured_ms"]["test-cpu"] > 0 and m["predicted_ms"]["test-cpu"] > 0 for m in selection["measurements"]
    )
    assert selection["plan"]["index"] in {m["index"] for m in selection["measurements"]}
    assert "measured ms" in result.output and "test-cpu" in result.output

    resumed = runner.invoke(app, [*base, "--steps", "40", "--finetune-steps", "0", "--resume"])
    assert resumed.exit_code == 0, resumed.output
    report = json.loads((out / "report.json").read_text())
    assert report["search"]["steps_done"] == 40

    exported = tmp_path / "exported"
    result = runner.invoke(app, ["export", "--checkpoint", str(out / "checkpoint.pt"), "--out", str(exported)])
    assert result.exit_code == 0, result.output
    assert (exported / "model.onnx").stat().st_size > 1000
    # The checkpoint records the measured width choice, so export rebuilds the network the search exported.
    assert json.loads((exported / "arch.json").read_text()) == json.loads((out / "arch.json").read_text())

    result = runner.invoke(app, ["evaluate", "--arch", str(out / "arch.json"), "--weights", str(out / "model.pt")])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["accuracy"] == pytest.approx(report["accuracy"], abs=1e-6)


def test_cached_tables_stand_in_for_a_stopped_service(service: LiveService, cache_dir: Path) -> None:
    """Runs last in this module: it stops the shared service."""
    layers = table_layers(digits_space().latency_layers(), 4)
    live = DeviceService(service.url, cache_dir=cache_dir).latency_tables(layers)
    assert not live.from_cache and live.device_id == "test-cpu"
    service.stop()
    down = DeviceService(service.url, retries=1, backoff=0.01, cache_dir=cache_dir)
    cached = down.latency_tables(layers)
    assert cached.from_cache and cached.predictor_version == live.predictor_version
    assert all((a == b).all() for a, b in zip(cached.tables, live.tables, strict=True))
    other_layers = table_layers(digits_space(width_multiplier=0.5).latency_layers(), 4)
    with pytest.raises(Exception, match="no cached tables"):
        down.latency_tables(other_layers)


def one_line_error(result: object) -> str:
    output = getattr(result, "stderr", "") or getattr(result, "output", "")
    lines = [line for line in output.strip().splitlines() if line.strip()]
    assert len(lines) == 1, output
    return lines[0]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--data", "imagenet", "--device", "http://127.0.0.1:1", "--target-latency-ms", "1"], "imagenet"),
        (["--device", "localhost:1", "--target-latency-ms", "1"], "http"),
        (["--device", "http://127.0.0.1:1", "--target-latency-ms", "1", "--target-latency-ms", "2"], "2 targets"),
        (["--device", "http://127.0.0.1:1", "--target-latency-ms", "1", "--space", "towers"], "towers"),
        (["--device", "http://127.0.0.1:1", "--target-latency-ms", "1", "--expectation", "mc"], "expectation"),
        (["--device", "http://127.0.0.1:1", "--target-latency-ms", "1", "--threshold", "1.5"], "--threshold"),
        (["--device", "http://127.0.0.1:1", "--target-latency-ms", "1", "--tolerance", "0"], "--tolerance"),
    ],
)
def test_search_bad_input_exits_2_with_one_line(args: list[str], needle: str, tmp_path: Path) -> None:
    result = runner.invoke(app, ["search", *args, "--steps", "1", "--out", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert needle in one_line_error(result)


def test_unreachable_device_without_cache_exits_3(tmp_path: Path, cache_dir: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = runner.invoke(app, ["search", "--device", url, "--target-latency-ms", "1", "--out", str(tmp_path)])
    assert result.exit_code == 3, result.output
    assert url in one_line_error(result)


def test_export_and_evaluate_bad_input(tmp_path: Path) -> None:
    result = runner.invoke(app, ["export", "--checkpoint", str(tmp_path / "none.pt"), "--out", str(tmp_path)])
    assert result.exit_code == 2 and "does not exist" in one_line_error(result)
    (tmp_path / "arch.json").write_text('{"format": "figs-arch/1", "nodes": []}')
    result = runner.invoke(
        app, ["evaluate", "--arch", str(tmp_path / "arch.json"), "--weights", str(tmp_path / "w.pt")]
    )
    assert result.exit_code == 2
    one_line_error(result)
