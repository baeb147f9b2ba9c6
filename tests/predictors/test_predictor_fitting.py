"""fit_predictors and LatencyPredictor on synthetic latencies shaped like this CPU's (a staircase in channels)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from predictors.fitting import DEFAULT_CANDIDATES, FitReport, LatencyPredictor, UnmodelledOpError, fit_predictors
from predictors.ops import Add, BatchNorm, Conv2d, Linear, OpSpec

Fitted = tuple[LatencyPredictor, list[FitReport], list[tuple[OpSpec, float]]]


def staircase_ms(op: Conv2d) -> float:
    """Launch cost + work over 16-channel blocks at ~40 GFLOP/s + a 40 % penalty for cin off a multiple of 16."""
    blocks = np.ceil(op.cin / 16) * np.ceil(op.cout / 16) * 256
    penalty = 1.4 if op.cin % 16 else 1.0
    return 0.006 + penalty * 2 * op.out_hw**2 * op.k**2 * blocks / 40e9 * 1e3


def random_convs(rng: np.random.Generator, n: int) -> list[Conv2d]:
    return [
        Conv2d(cin=int(cin), cout=int(cout), hw=int(hw), k=int(k))
        for cin, cout, hw, k in zip(
            rng.integers(4, 97, n), rng.integers(4, 97, n), rng.choice([7, 14, 28], n), rng.choice([1, 3], n),
            strict=True,
        )
    ]  # fmt: skip


@pytest.fixture(scope="module")
def fitted() -> Fitted:
    rng = np.random.default_rng(0)
    convs = random_convs(rng, 160)
    samples: list[tuple[OpSpec, float]] = [(op, staircase_ms(op) * rng.lognormal(0, 0.02)) for op in convs]
    samples += [(Add(c=c, hw=14), 0.002 + c * 14 * 14 * 12 / 20e9 * 1e3) for c in (16, 24, 32, 48, 64, 96)]
    samples += [(BatchNorm(c=16, hw=14), 0.004)]
    predictor, reports = fit_predictors(samples, seed=0, cv_folds=4)
    return predictor, reports, samples


def test_recovers_a_staircase_on_held_out_variants(fitted: Fitted) -> None:
    predictor, _, _ = fitted
    held_out = random_convs(np.random.default_rng(1), 200)
    truth = np.array([staircase_ms(op) for op in held_out])
    errors = np.abs(predictor.predict_ms(held_out) - truth) / truth
    assert float(np.median(errors)) < 0.04
    assert float(np.mean(errors <= 0.10)) > 0.9


def test_reports_compare_every_candidate_and_keep_the_best(fitted: Fitted) -> None:
    _, reports, _ = fitted
    by_kind = {r.op: r for r in reports}
    assert set(by_kind) == {"add", "batchnorm", "conv2d"}
    conv = by_kind["conv2d"]
    assert conv.n_samples == 160
    assert set(conv.candidates) == set(DEFAULT_CANDIDATES)
    scores = {name: mape for name, mape in conv.candidates.items() if mape is not None}
    assert conv.model == min(scores, key=lambda name: scores[name])
    assert conv.mape == conv.candidates[conv.model]
    assert conv.mape is not None and 0 < conv.mape < 0.1
    assert conv.within_10pct is not None and 0.8 < conv.within_10pct <= 1
    assert by_kind["add"].mape is not None and by_kind["add"].n_samples == 6


def test_kernel_classes_unseen_in_fitting_fall_back_to_the_pooled_roofline(fitted: Fitted) -> None:
    predictor, _, _ = fitted
    depthwise, grouped = Conv2d(cin=32, cout=32, hw=14, k=3, groups=32), Conv2d(cin=32, cout=64, hw=14, k=3, groups=4)
    values = predictor.predict_ms([depthwise, grouped])
    assert np.all(np.isfinite(values)) and np.all(values > 0)


def test_measured_variants_come_from_the_table(fitted: Fitted) -> None:
    predictor, _, samples = fitted
    measured_op, measured_ms = samples[0]
    unseen = Conv2d(cin=50, cout=70, hw=14, k=3)
    (ms_a, source_a), (ms_b, source_b) = predictor.predict([measured_op, unseen])
    assert (ms_a, source_a) == (measured_ms, "measured")
    assert source_b == "predicted"
    assert ms_b == pytest.approx(float(predictor.predict_ms([unseen])[0]))


def test_unmodelled_kind_raises(fitted: Fitted) -> None:
    predictor, _, _ = fitted
    with pytest.raises(UnmodelledOpError) as caught:
        predictor.predict([Conv2d(cin=8, cout=8, hw=8), Linear(cin=8, cout=8)])
    assert caught.value.kind == "linear"
    assert isinstance(caught.value, KeyError) and isinstance(caught.value, ValueError)
    assert "linear" in str(caught.value)
    with pytest.raises(UnmodelledOpError):
        predictor.predict_ms([Linear(cin=8, cout=8)])
    assert predictor.kinds == ["add", "batchnorm", "conv2d"]


def test_json_round_trip_keeps_predictions_and_version(fitted: Fitted) -> None:
    predictor, _, _ = fitted
    text = json.dumps(predictor.to_json())
    restored = LatencyPredictor.from_json(json.loads(text))
    ops = random_convs(np.random.default_rng(2), 50)
    np.testing.assert_array_equal(restored.predict_ms(ops), predictor.predict_ms(ops))
    assert restored.version == predictor.version and len(predictor.version) == 16
    changed = json.loads(text)
    changed["kinds"]["batchnorm"]["table"] = {}
    assert LatencyPredictor.from_json(changed).version != predictor.version


def test_predictor_loads_and_predicts_without_sklearn(fitted: Fitted, tmp_path: Path) -> None:
    predictor, _, _ = fitted
    ops = random_convs(np.random.default_rng(3), 20)
    (tmp_path / "predictor.json").write_text(json.dumps(predictor.to_json()))
    (tmp_path / "ops.json").write_text(json.dumps([op.to_dict() for op in ops]))
    script = f"""
import json, sys
sys.modules["sklearn"] = None
sys.modules["scipy"] = None
from predictors.fitting import LatencyPredictor
from predictors.ops import op_from_dict
predictor = LatencyPredictor.from_json(json.load(open({str(tmp_path / "predictor.json")!r})))
ops = [op_from_dict(d) for d in json.load(open({str(tmp_path / "ops.json")!r}))]
print(json.dumps([predictor.version, predictor.predict_ms(ops).tolist()]))
"""
    done = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True, timeout=60)
    version, values = json.loads(done.stdout)
    assert version == predictor.version
    np.testing.assert_array_equal(values, predictor.predict_ms(ops))


def test_bad_predictor_documents_name_the_field(fitted: Fitted) -> None:
    predictor, _, _ = fitted
    data = predictor.to_json()
    with pytest.raises(ValueError, match="format"):
        LatencyPredictor.from_json({**data, "format": "pickle"})
    with pytest.raises(ValueError, match="format_version"):
        LatencyPredictor.from_json({**data, "format_version": 99})
    stale = json.loads(json.dumps(data))
    stale["kinds"]["conv2d"]["feature_names"] = stale["kinds"]["conv2d"]["feature_names"][:-1]
    with pytest.raises(ValueError, match=r"kinds\.conv2d\.feature_names"):
        LatencyPredictor.from_json(stale)


def test_few_samples_fall_back_to_a_roofline_ratio() -> None:
    one = [(BatchNorm(c=16, hw=14), 0.004)]
    predictor, (report,) = fit_predictors(one)
    assert (report.n_samples, report.mape, report.within_10pct, report.model) == (1, None, None, "roofline_ratio")
    bigger = float(predictor.predict_ms([BatchNorm(c=64, hw=14)])[0])
    assert bigger == pytest.approx(0.016)  # one scale over memory-bound work: 4x the channels, 4x the bytes and time

    three = [(BatchNorm(c=c, hw=14), 0.001 * c / 16) for c in (16, 32, 64)]
    _, (report,) = fit_predictors(three)
    assert report.n_samples == 3 and report.mape is not None and report.mape < 1e-9
    assert report.within_10pct == 1.0


def test_repeated_measurements_merge_to_their_median() -> None:
    op = BatchNorm(c=16, hw=14)
    predictor, (report,) = fit_predictors([(op, 0.004), (op, 0.005), (op, 0.009)])
    assert report.n_samples == 1
    assert predictor.predict([op]) == [(0.005, "measured")]


@pytest.mark.parametrize(
    ("samples", "field"),
    [
        ([(BatchNorm(c=16, hw=14), 0.0)], r"samples\[0\]\.latency_ms"),
        ([(BatchNorm(c=16, hw=14), 0.1), (BatchNorm(c=8, hw=14), float("nan"))], r"samples\[1\]\.latency_ms"),
        ([(BatchNorm(c=16, hw=14), True)], r"samples\[0\]\.latency_ms"),
        ([({"op": "batchnorm"}, 0.1)], r"samples\[0\]"),
    ],
)
def test_bad_samples_name_the_field(samples: list[tuple[object, object]], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        fit_predictors(samples)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cv_folds"):
        fit_predictors([(BatchNorm(c=16, hw=14), 0.1)], cv_folds=1)
    with pytest.raises(ValueError, match="candidates"):
        fit_predictors([(BatchNorm(c=16, hw=14), 0.1)], candidates=["neural_net"])


def test_predict_ms_handles_a_search_sized_channel_grid(fitted: Fitted) -> None:
    predictor, _, _ = fitted
    # The search client asks for ~50 layers x a 64x64 channel grid; the bound only catches a pathological slowdown.
    grid = [Conv2d(cin=a, cout=b, hw=14, k=3) for a in range(1, 65) for b in range(1, 65)] * 25
    started = time.perf_counter()
    values = predictor.predict_ms(grid)
    elapsed = time.perf_counter() - started
    assert values.shape == (len(grid),) and np.all(values > 0)
    assert elapsed < 30, f"100k predictions took {elapsed:.1f} s"
