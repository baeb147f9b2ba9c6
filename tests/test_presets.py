"""Profiling presets: valid, deterministic, covering every kind, and fast enough to measure."""

from __future__ import annotations

import time

import pytest

from latency_service.backends.onnxruntime import OnnxRuntimeBackend
from latency_service.measurement import MeasurementConfig, measure
from latency_service.presets import PRESETS, UnknownPresetError, describe_preset, preset_ops
from predictors.ops import OPERATORS, Conv2d, op_from_dict


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_is_valid_unique_deterministic_and_covers_every_kind(name: str) -> None:
    ops = preset_ops(name)
    assert [op.key for op in ops] == [op.key for op in preset_ops(name)]
    assert len({op.key for op in ops}) == len(ops)
    assert {op.kind for op in ops} == set(OPERATORS)
    for op in ops:
        assert op_from_dict(op.to_dict()) == op


def test_standard_preset_spans_the_layers_real_cnns_use() -> None:
    ops = preset_ops("standard")
    assert 600 <= len(ops) <= 1200
    convs = [op for op in ops if isinstance(op, Conv2d)]
    depthwise = [op for op in convs if op.depthwise]
    assert {op.k for op in depthwise} >= {3, 5, 7}
    assert {op.stride for op in convs} >= {1, 2}
    assert {op.k for op in convs if not op.depthwise and op.groups == 1} >= {1, 3, 5, 7}
    assert any(1 < op.groups < op.cin for op in convs)
    hws = {op.hw for op in convs}
    assert min(hws) <= 7 and max(hws) >= 112
    channels = [op.cout for op in convs]
    assert min(channels) <= 8 and max(channels) >= 1024
    # The staircase lives between the multiples of 8 and 16: both sides must be sampled.
    assert sum(c % 8 != 0 for c in channels) > len(channels) // 10
    assert {op.act for op in convs} >= {None, "relu", "relu6", "hardswish", "silu"}


def test_unknown_preset_names_the_known_ones() -> None:
    with pytest.raises(UnknownPresetError, match="smoke") as info:
        preset_ops("nope")
    assert isinstance(info.value, ValueError) and info.value.field == "preset"


def test_describe_preset_counts_kinds() -> None:
    description = describe_preset("smoke")
    assert description["variants"] == len(preset_ops("smoke"))
    assert sum(description["kinds"].values()) == description["variants"]


@pytest.mark.slow
def test_smoke_preset_measures_in_under_a_minute() -> None:
    backend = OnnxRuntimeBackend()
    config = MeasurementConfig()
    started = time.perf_counter()
    for op in preset_ops("smoke"):
        runnable = backend.prepare_op(op)
        try:
            stats = measure(runnable, config)
        finally:
            runnable.close()
        assert stats.median_ms > 0
    assert time.perf_counter() - started < 60
