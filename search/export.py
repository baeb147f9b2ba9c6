"""The device-facing end of a search: ONNX export, calibration and verification on the devices, evaluation.

A searched network is only done when each device has measured it; this module holds everything between the
trained supernet and that measurement (the search loop itself is ``search.trainer``).
"""

from __future__ import annotations

import io
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from search.costs import CostModel
from search.data import DataBundle
from search.gates import ChannelGate, GateConfig, GateGroup, OperatorGate, OperatorGated
from search.service_client import (
    DeviceService,
    dense_tables,
    table_layers,
)
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


def channel_gates(source: object) -> list[ChannelGate]:
    """The learnable channel gates behind a source (through operator switches and tied groups)."""
    if isinstance(source, ChannelGate):
        return [] if source.config.fixed_on else [source]
    if isinstance(source, OperatorGated):
        return channel_gates(source.inner)
    if isinstance(source, GateGroup):
        return [g for member in source.members for g in channel_gates(member)]
    return []


@torch.no_grad()
def force_alive(gate: ChannelGate | OperatorGate, keep: torch.Tensor, threshold: float, margin: float = 0.05) -> None:
    """Move log-odds just across ``threshold`` so exactly ``keep`` is alive; the other log-odds stay where they are."""
    saved = gate.log_odds.clone()
    gate.log_odds.zero_()
    # The log-odds at which keep_probability is 0.5 (hard-concrete shifts it), probed instead of hard-coded.
    shift = -float(torch.logit(gate.keep_probability()[-1].clamp(1e-6, 1 - 1e-6)))
    gate.log_odds.copy_(saved)
    boundary = math.log(threshold / (1 - threshold)) + shift
    gate.log_odds.copy_(torch.where(keep, saved.clamp(min=boundary + margin), saved.clamp(max=boundary - margin)))


def aligned_count(count: float, width: int, multiple: int) -> int:
    """``count`` rounded half-up to a multiple of ``multiple``, at least one multiple and at most what fits in
    ``width`` (a width of at most one multiple: whole channels in [1, width]); a dead unit (0) stays dead."""
    if count <= 0:
        return 0
    if width <= multiple:
        return min(width, max(1, math.floor(count + 0.5)))
    return min((width // multiple) * multiple, max(multiple, math.floor(count / multiple + 0.5) * multiple))


@dataclass
class WidthUnit:
    """Channels that compact to one width: a lone gate, or the gates tied by residual adds (one keep set for all)."""

    gates: list[ChannelGate]
    probability: torch.Tensor  # P(alive) per channel, the ranking
    alive: torch.Tensor  # alive at the threshold, as compaction sees it

    @property
    def live(self) -> int:
        return int(self.alive.sum())

    def keep(self, count: int) -> torch.Tensor:
        """The ``count`` channels to keep: alive ones first, then by probability (nested as ``count`` grows)."""
        order = torch.argsort(
            self.probability + 2.0 * self.alive.to(self.probability.dtype), descending=True, stable=True
        )
        keep = torch.zeros(self.probability.numel(), dtype=torch.bool)
        keep[order[:count]] = True
        return keep

    def force(self, keep: torch.Tensor, threshold: float, margin: float = 0.05) -> None:
        for gate in self.gates:
            force_alive(gate, keep, threshold, margin)


@torch.no_grad()
def width_units(space: SearchSpace, threshold: float = 0.5) -> list[WidthUnit]:
    """The space's width units; groups that share a gate (the add aggregator's overlapping sums) are merged."""
    groups = {id(s): s for layer in space.latency_layers() for s in (layer.cin_source, layer.cout_source)}
    merged: list[tuple[dict[int, ChannelGate], torch.Tensor]] = []
    for group in (g for g in groups.values() if isinstance(g, GateGroup)):
        gates = {id(g): g for g in channel_gates(group)}
        alive = group.alive(threshold)
        for other in [m for m in merged if gates.keys() & m[0].keys()]:
            merged.remove(other)
            gates |= other[0]
            alive = alive | other[1]
        if gates:
            merged.append((gates, alive))
    tied = {key for gates, _ in merged for key in gates}
    for gate in space.gates():
        if isinstance(gate, ChannelGate) and id(gate) not in tied and not gate.config.fixed_on:
            merged.append(({id(gate): gate}, gate.alive(threshold)))
    units = []
    for gates, alive in merged:
        dead = torch.stack([1 - g.keep_probability() for g in gates.values()]).prod(dim=0)
        units.append(WidthUnit(list(gates.values()), (1 - dead).detach(), alive))
    return units


def align_channel_counts(space: SearchSpace, multiple: int, threshold: float = 0.5, *, margin: float = 0.05) -> None:
    """Round every kept width to the nearest multiple of ``multiple`` (at least one multiple) before compaction.

    Measured on this CPU (onnxruntime 1.32, 1 thread, digits-sized blocks tower): uniform networks whose widths
    are multiples of 8 ran in 0.20-0.28 ms, the same tower at widths like 9, 18, 27, 54 in 0.8-1.3 ms — the
    runtime keeps its blocked NCHWc layout only for aligned channel counts.  Tied channels (residual streams) are
    aligned as one unit: every member keeps the unit's channels, so the union is the aligned set.
    """
    if multiple <= 1:
        return
    for unit in width_units(space, threshold):
        unit.force(unit.keep(aligned_count(unit.live, unit.alive.numel(), multiple)), threshold, margin)


def compact_aligned(
    space: SearchSpace, *, threshold: float = 0.5, multiple: int = 8
) -> tuple[nn.Module, dict[str, Any]]:
    align_channel_counts(space, multiple, threshold)
    return space.compact(threshold=threshold)


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
        """Theil-Sen line: the median of pairwise slopes, so one measurement disturbed by a busy machine (seen
        here: one of four uniform models measured 3x its neighbours) does not tilt the map."""
        if len(points) < 2:
            raise ValueError("calibration needs at least two models")
        x = np.array([p[0] for p in points])
        y = np.array([p[1] for p in points])
        slopes = [(y[j] - y[i]) / (x[j] - x[i]) for i in range(len(x)) for j in range(i + 1, len(x)) if x[j] != x[i]]
        scale = float(np.median(slopes)) if slopes else 0.0
        if not scale > 0.05:
            # Noise swamped the width effect: a proportional fit at least keeps the map monotone.
            return cls(offset_ms=0.0, scale=float(y.sum() / x.sum()), points=tuple(points))
        offset = float(np.median(y - scale * x))
        return cls(offset_ms=offset, scale=scale, points=tuple(points))


def calibrate_device(
    service: DeviceService,
    uniform_spaces: list[SearchSpace],
    *,
    in_channels: int,
    image_size: int,
    repeats: int = 2,
    multiple: int = 1,
) -> LatencyCalibration:
    """Measure each uniform-width space (all gates on, compacted) on the device and fit the table → measured map."""
    points = []
    for space in uniform_spaces:
        # Aligned the way searched networks are, and pushed far from the threshold so the expectation below is the
        # deterministic network's table latency.
        align_channel_counts(space, multiple, margin=12.0)
        model, _ = space.compact()
        onnx = onnx_bytes(model, in_channels, image_size)
        # Interference from other processes only ever adds time: the lowest of a few medians is the most faithful.
        measured = min(service.measure_model(onnx).median_ms for _ in range(repeats))
        layers = space.latency_layers()
        tables = dense_tables(layers, service.latency_tables(table_layers(layers, 4)))
        table_ms = float(CostModel.from_space(space, {"device": tables}).evaluate().latency_ms["device"].detach())
        points.append((table_ms, measured))
    return LatencyCalibration.fit(points)


@dataclass
class DeviceLink:
    """A device service and the name its tables and targets go by (its device id, made unique)."""

    url: str
    service: DeviceService
    name: str = ""


def connect_devices(urls: list[str], *, token: str | None = None, retries: int = 3) -> list[DeviceLink]:
    if len(set(urls)) != len(urls):
        raise ValueError("--device: the same URL is given twice")
    return [DeviceLink(url=url, service=DeviceService(url, token, retries=retries)) for url in urls]


def device_tables(
    links: list[DeviceLink], space: SearchSpace, *, count_step: int, console: Console | None = None
) -> dict[str, list[torch.Tensor]]:
    """Ask every device for the space's latency tables (or take them from the cache) and name the devices."""
    layers = space.latency_layers()
    requests = table_layers(layers, count_step)
    tables: dict[str, list[torch.Tensor]] = {}
    for link in links:
        answer = link.service.latency_tables(requests)
        name = answer.device_id or link.url
        link.name = name if name not in tables else f"{name}@{link.url}"
        tables[link.name] = dense_tables(layers, answer)
        if console is not None:
            source = "cache (service unreachable)" if answer.from_cache else f"predictor {answer.predictor_version}"
            console.print(f"tables for {link.name} from {source}: {len(requests)} layers", highlight=False)
    return tables


CALIBRATION_MULTIPLIERS = (0.25, 0.5, 0.75, 1.0)


def calibrate_devices(
    links: list[DeviceLink], space: str, bundle: DataBundle, console: Console, *, multiple: int = 1
) -> dict[str, LatencyCalibration]:
    """Per device, the table → measured map from uniform-width models of ``space`` (all gates fixed on)."""
    uniform = [
        create_space(
            space,
            in_channels=bundle.in_channels,
            num_classes=bundle.num_classes,
            image_size=bundle.image_size,
            width_multiplier=m,
        )
        for m in CALIBRATION_MULTIPLIERS
    ]
    calibrations = {}
    for link in links:
        calibration = calibrate_device(
            link.service, uniform, in_channels=bundle.in_channels, image_size=bundle.image_size, multiple=multiple
        )
        calibrations[link.name] = calibration
        console.print(
            f"{link.name}: measured ≈ {calibration.offset_ms:.4f} + {calibration.scale:.3f} × table ms "
            f"(uniform models measured {', '.join(f'{p[1]:.4f}' for p in calibration.points)} ms)",
            highlight=False,
        )
    return calibrations


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
    "CALIBRATION_MULTIPLIERS",
    "ONNX_OPSET",
    "DeviceLink",
    "Evaluation",
    "LatencyCalibration",
    "WidthUnit",
    "align_channel_counts",
    "aligned_count",
    "calibrate_device",
    "calibrate_devices",
    "channel_gates",
    "compact_aligned",
    "connect_devices",
    "device_tables",
    "evaluate",
    "export_onnx",
    "force_alive",
    "load_checkpoint_space",
    "onnx_bytes",
    "read_architecture",
    "width_units",
    "write_architecture",
]
