"""Export of the compact network: ONNX that onnxruntime runs with the same outputs, architecture JSON, plots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from search.data import load_dataset
from search.export import (
    LatencyCalibration,
    compact_aligned,
    evaluate,
    export_onnx,
    read_architecture,
    write_architecture,
)
from search.plots import plot_keep_probabilities, plot_trajectory
from search.spaces.base import SearchSpace, create_space, from_architecture

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def digits_space() -> SearchSpace:
    torch.manual_seed(0)
    space = create_space("blocks", in_channels=1, num_classes=10, image_size=8)
    with torch.no_grad():  # switch some channels and one operator off so the compact net really is smaller
        for gate in space.gates():
            gate.log_odds[1::3] = -3.0
    return space.eval()


def test_onnx_matches_torch_and_has_static_batch_one(digits_space: SearchSpace, tmp_path: Path) -> None:
    compact, _ = digits_space.compact()
    compact.eval()
    data = export_onnx(compact, tmp_path / "model.onnx", in_channels=1, image_size=8)
    model = onnx.load_from_string(data)
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 1, 8, 8]
    assert model.opset_import[0].version == 17
    x = torch.randn(1, 1, 8, 8)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(onnx_out, compact(x).numpy(), rtol=1e-4, atol=1e-4)
    full_params = sum(p.numel() for p in digits_space.weight_parameters())
    assert sum(p.numel() for p in compact.parameters()) < full_params


def test_architecture_json_round_trip(digits_space: SearchSpace, tmp_path: Path) -> None:
    compact, arch = digits_space.compact()
    write_architecture(arch, tmp_path / "arch.json")
    rebuilt = from_architecture(read_architecture(tmp_path / "arch.json"))
    rebuilt.load_state_dict(compact.state_dict())
    x = torch.randn(4, 1, 8, 8)
    compact.eval()
    rebuilt.eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), compact(x))


def test_aligned_compaction_rounds_widths_and_keeps_the_function() -> None:
    torch.manual_seed(1)
    space = create_space("blocks", in_channels=1, num_classes=10, image_size=8)
    with torch.no_grad():
        for gate in space.gates():
            gate.log_odds.copy_(torch.randn(gate.log_odds.shape) * 2)
    space.eval()
    _, raw_arch = space.compact()
    compact, arch = compact_aligned(space, multiple=8)
    widths = [node["cout"] for node in arch["nodes"] if node["op"] == "conv"]
    assert any(w % 8 for w in (n["cout"] for n in raw_arch["nodes"] if n["op"] == "conv")), "test needs odd widths"
    assert all(w % 8 == 0 for w in widths), widths
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(compact.eval()(x), space(x), rtol=1e-4, atol=1e-5)


def test_read_architecture_rejects_non_objects(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        read_architecture(tmp_path / "a.json")
    (tmp_path / "b.json").write_text("{nope")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_architecture(tmp_path / "b.json")


def test_evaluate_counts_correct_predictions(digits_space: SearchSpace) -> None:
    bundle = load_dataset("digits")
    compact, _ = digits_space.compact()
    result = evaluate(compact, bundle.val)
    assert result.n == len(bundle.val)
    assert 0.0 <= result.accuracy <= 1.0 and result.loss > 0
    with pytest.raises(ValueError, match="empty"):
        evaluate(compact, torch.utils.data.TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)))


def test_calibration_fit_and_inverse() -> None:
    calibration = LatencyCalibration.fit([(1.0, 0.35), (2.0, 0.55), (4.0, 0.95)])
    assert calibration.scale == pytest.approx(0.2)
    assert calibration.offset_ms == pytest.approx(0.15)
    assert calibration.to_measured(calibration.to_table(0.5)) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="two"):
        LatencyCalibration.fit([(1.0, 1.0)])
    disturbed = LatencyCalibration.fit([(1.0, 0.35), (2.0, 0.55), (3.0, 2.0), (4.0, 0.95)])  # one busy-machine outlier
    assert disturbed.scale == pytest.approx(0.2)
    flat = LatencyCalibration.fit([(1.0, 0.5), (2.0, 0.49)])  # noise, not a width effect: proportional fallback
    assert flat.offset_ms == 0.0 and flat.scale > 0


def test_plots_write_pngs(digits_space: SearchSpace, tmp_path: Path) -> None:
    probabilities = {name: p.tolist() for name, p in digits_space.keep_probabilities().items()}
    plot_keep_probabilities(probabilities, tmp_path / "keep.png")
    history = [
        {"step": float(s), "latency_ms/cpu": 1.0 / s, "train_accuracy": 0.5, **({"val_accuracy": 0.6} if s % 2 else {})}
        for s in range(1, 6)
    ]
    plot_trajectory(history, tmp_path / "trajectory.png", targets_ms={"cpu": 0.4})
    for name in ("keep.png", "trajectory.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_SIGNATURE
    with pytest.raises(ValueError, match="empty"):
        plot_trajectory([], tmp_path / "x.png", targets_ms={})
    json.dumps(probabilities)  # plots take what the report stores
