"""Export of the compact network (ONNX, architecture JSON) and its evaluation."""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from search.gates import GateConfig
from search.service_client import DeviceService, TableLayer
from search.spaces.base import SearchSpace, create_space

ONNX_OPSET = 17


@dataclass(frozen=True)
class Evaluation:
    accuracy: float
    loss: float
    n: int


def onnx_bytes(model: nn.Module, in_channels: int, image_size: int) -> bytes:
    """The model as ONNX with a static batch-1 input, the form the latency services measure and predict.

    The TorchScript-based exporter is used because it takes well under a second for these networks, where the
    dynamo-based one takes several seconds per export (the benchmark exports dozens).
    """
    was_training = model.training
    model.eval()
    example = torch.randn(1, in_channels, image_size, image_size)
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice on every call
            torch.onnx.export(
                model,
                (example,),
                buffer,  # type: ignore[arg-type]  # the TorchScript exporter writes to any binary file object
                dynamo=False,
                opset_version=ONNX_OPSET,
                input_names=["input"],
                output_names=["logits"],
                do_constant_folding=True,
            )
    finally:
        model.train(was_training)
    return buffer.getvalue()


def export_onnx(model: nn.Module, path: Path | str, *, in_channels: int, image_size: int) -> bytes:
    data = onnx_bytes(model, in_channels, image_size)
    Path(path).write_bytes(data)
    return data


def write_architecture(arch: dict[str, Any], path: Path | str) -> None:
    Path(path).write_text(json.dumps(arch, indent=2, sort_keys=True))


def read_architecture(path: Path | str) -> dict[str, Any]:
    try:
        arch = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(arch, dict):
        raise ValueError(f"{path}: an architecture must be a JSON object")
    return arch


def load_checkpoint_space(checkpoint: Path | str) -> tuple[SearchSpace, dict[str, Any]]:
    """Rebuild the searched supernet from a search checkpoint; returns it (eval mode) and the checkpoint's metadata."""
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"--checkpoint: {path} does not exist")
    state = torch.load(path, weights_only=False, map_location="cpu")
    if not isinstance(state, dict) or "space" not in state or "meta" not in state:
        raise ValueError(f"--checkpoint: {path} is not a figs search checkpoint")
    meta = state["meta"]
    space = create_space(
        meta["space"],
        in_channels=meta["in_channels"],
        num_classes=meta["num_classes"],
        image_size=meta["image_size"],
        gate=GateConfig(**meta.get("gate", {})),
    )
    space.load_state_dict(state["space"])
    space.eval()
    return space, meta


@dataclass(frozen=True)
class LatencyCalibration:
    """``measured_ms ≈ offset_ms + scale · table_ms`` on one device, fitted on uniform-width models.

    The tables predict each layer as if it ran alone; a whole model runs them in one session, with one per-run
    overhead, fused residual adds and no layout reorder between layers.  On this CPU the layer sum over-predicts a
    small-image network by 2-4x, so a target in measured ms must be mapped into table ms before the search.
    """

    offset_ms: float
    scale: float
    points: tuple[tuple[float, float], ...]  # (table ms, measured ms) per calibration model

    def to_table(self, measured_ms: float) -> float:
        return (measured_ms - self.offset_ms) / self.scale

    def to_measured(self, table_ms: float) -> float:
        return self.offset_ms + self.scale * table_ms

    @classmethod
    def identity(cls) -> LatencyCalibration:
        return cls(offset_ms=0.0, scale=1.0, points=())

    @classmethod
    def fit(cls, points: list[tuple[float, float]]) -> LatencyCalibration:
        if len(points) < 2:
            raise ValueError("calibration needs at least two models")
        x = np.array([p[0] for p in points])
        y = np.array([p[1] for p in points])
        scale, offset = np.polyfit(x, y, 1)
        if not scale > 0.05:
            # Noise swamped the width effect: a proportional fit at least keeps the map monotone.
            scale, offset = float(y.sum() / x.sum()), 0.0
        return cls(offset_ms=float(offset), scale=float(scale), points=tuple(points))


def table_latency_ms(service: DeviceService, latency_layers: list[Any]) -> float:
    """Sum of the table predictions of every latency layer at its own full widths (all gates on)."""
    requests = [TableLayer(layer.op, (layer.op.cin,), (layer.op.cout,)) for layer in latency_layers]
    return float(sum(table[0, 0] for table in service.latency_tables(requests).tables))


def calibrate_device(
    service: DeviceService, uniform_spaces: list[SearchSpace], *, in_channels: int, image_size: int
) -> LatencyCalibration:
    """Measure each uniform-width space (all gates on, compacted) on the device and fit the table → measured map."""
    points = []
    for space in uniform_spaces:
        model, _ = space.compact(threshold=0.5)
        measured = service.measure_model(onnx_bytes(model, in_channels, image_size)).median_ms
        points.append((table_latency_ms(service, space.latency_layers()), measured))
    return LatencyCalibration.fit(points)


@torch.no_grad()
def evaluate(model: nn.Module, data: TensorDataset | DataLoader, *, batch_size: int = 512) -> Evaluation:
    """Top-1 accuracy and mean cross-entropy of ``model`` in eval mode (no gate sampling, no dropout)."""
    loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=batch_size)
    was_training = model.training
    model.eval()
    correct = 0
    total = 0
    loss_sum = 0.0
    try:
        for inputs, labels in loader:
            logits = model(inputs)
            loss_sum += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(dim=1) == labels).sum())
            total += int(labels.numel())
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    return Evaluation(accuracy=correct / total, loss=loss_sum / total, n=total)


__all__ = [
    "ONNX_OPSET",
    "Evaluation",
    "LatencyCalibration",
    "calibrate_device",
    "evaluate",
    "export_onnx",
    "load_checkpoint_space",
    "onnx_bytes",
    "read_architecture",
    "table_latency_ms",
    "write_architecture",
]
