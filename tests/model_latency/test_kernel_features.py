"""The kernel predictor's two physical features: padding-aware conv work and the network's cache footprint."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import latency_service.kernel_fit as kernel_fit
from latency_service.backends.onnxruntime import OnnxRuntimeBackend
from latency_service.kernel_fit import (
    KernelPredictor,
    fit_kernel_predictor,
    host_l3_bytes,
    network_context,
)
from latency_service.kernel_generator import NetworkBuilder
from latency_service.kernel_profiling import KernelSample, ProfiledNetwork, optimise
from predictors.kernel_shapes import conv_tap_coverage
from predictors.kernels import FEATURE_NAMES, Kernel, decompose, network_kernel_bytes, rederive_conv_work


@pytest.mark.parametrize(
    ("size", "stride", "mean_taps", "touched"),
    [
        (1, 1, 1.0, 1),  # only the centre tap meets the map
        (2, 1, 2.0, 3),  # each output sees 2 of 3 taps per axis, but together they use all 3 weight taps
        (224, 1, (3 * 224 - 2) / 224, 3),  # the border costs 2 of 672 taps
        (2, 2, 2.0, 2),  # one output at -1..1: the tap at -1 is padding
    ],
)
def test_tap_coverage_along_one_axis(size: int, stride: int, mean_taps: float, touched: int) -> None:
    size_out = (size + 2 - 3) // stride + 1
    assert conv_tap_coverage(size, size_out, 3, stride, 1) == (pytest.approx(mean_taps), touched)


def _conv_kernel(backend: OnnxRuntimeBackend, hw: int, channels: int = 192) -> Kernel:
    builder = NetworkBuilder(rng=np.random.default_rng(0), hw=hw, in_channels=channels)
    x = builder.conv(builder.input(), channels, k=1, act="relu")
    y = builder.conv(x, channels, k=3, act="relu")
    kernels = decompose(optimise(backend, builder.build(y).SerializeToString()))
    (conv3x3,) = [k for k in kernels if k.kernel_class in ("conv", "conv_nchw") and k.input_shapes[1][2] == 3]
    return conv3x3


def _flops_and_bytes(kernel: Kernel) -> tuple[float, float]:
    features = kernel.feature_dict()
    return features["flops"], features["bytes"]


def test_a_3x3_conv_on_a_1x1_map_does_one_tap_of_work(backend: OnnxRuntimeBackend) -> None:
    one = _conv_kernel(backend, hw=1)
    flops, bytes_ = _flops_and_bytes(one)
    assert flops == 2.0 * 192 * 192 * 1
    # Only the centre tap's weights are read: both copies of the weight in the byte count shrink to 1/9.
    weights = 4.0 * 192 * 192 * 9
    assert bytes_ < weights / 9 * 2 + 4.0 * 192 * 16

    two = _conv_kernel(backend, hw=2)
    assert _flops_and_bytes(two)[0] == 2.0 * 4 * 192 * 192 * 4  # 2x2 taps per output
    assert _flops_and_bytes(two)[1] > 2 * weights  # but every weight tap is used by some output

    large = _conv_kernel(backend, hw=56, channels=16)
    taps = _flops_and_bytes(large)[0] / (2.0 * 56 * 56 * 16 * 16)
    assert taps == pytest.approx(((3 * 56 - 2) / 56) ** 2) and 8.4 < taps < 9.0


def test_networks_saved_with_all_taps_are_read_with_in_map_taps(backend: OnnxRuntimeBackend) -> None:
    conv = _conv_kernel(backend, hw=1)
    network = ProfiledNetwork("old", {}, [conv], [0.005], wall_ms=0.01, overhead_ms=0.0025)
    saved = network.to_json()
    assert ProfiledNetwork.from_json(saved).kernels == [conv]
    old_features = rederive_conv_work(conv, in_map_only=False).features
    assert old_features[FEATURE_NAMES["conv"].index("flops")] == 2.0 * 192 * 192 * 9
    del saved["conv_taps"]  # a file written before padding-aware conv work
    saved["kernels"][0]["features"] = list(old_features)
    (restored,) = ProfiledNetwork.from_json(saved).kernels
    assert restored.features == pytest.approx(conv.features)


def test_same_upper_auto_pad_counts_in_map_taps() -> None:
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 8, 1, 1])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    weight = numpy_helper.from_array(np.zeros((8, 8, 3, 3), np.float32), "w")
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", kernel_shape=[3, 3], auto_pad="SAME_UPPER")
    model = helper.make_model(helper.make_graph([node], "g", [x], [y], initializer=[weight]))
    (kernel,) = decompose(model)
    assert kernel.kernel_class == "conv_nchw" and kernel.output_shapes == ((1, 8, 1, 1),)
    assert kernel.feature_dict()["flops"] == 2.0 * 8 * 8


def test_host_l3_is_read_from_sysfs_or_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for index, level, size in (("index2", "2", "2048K"), ("index3", "3", "36M")):
        (tmp_path / index).mkdir()
        (tmp_path / index / "level").write_text(level + "\n")
        (tmp_path / index / "size").write_text(size + "\n")
    monkeypatch.setattr(kernel_fit, "_CACHE_SYSFS", tmp_path)
    assert host_l3_bytes() == 36 * 2**20
    monkeypatch.setattr(kernel_fit, "_CACHE_SYSFS", tmp_path / "missing")
    assert host_l3_bytes() == kernel_fit.DEFAULT_L3_BYTES


def test_network_context_caps_at_the_cache_size() -> None:
    cache = 32.0 * 2**20
    assert network_context(2**20, cache) == pytest.approx(math.log2(1 + 2**20))
    assert network_context(cache, cache) == network_context(50 * cache, cache) == pytest.approx(math.log2(1 + cache))


def _gemm(n: int, network: int) -> Kernel:
    features = (1.0, float(n), float(n), 2.0 * n * n, 4.0 * (n * n + 2 * n))
    assert len(features) == len(FEATURE_NAMES["gemm"])
    return Kernel(f"gemm{network}_{n}", "Gemm", "", "gemm", features, ((1, n), (n, n)), ((1, n),))


def _padding(megabytes: float) -> Kernel:
    """A reorder kernel that only adds footprint (no regressor for it below: predicted by the fallback)."""
    elements = int(megabytes * 2**20 / 8)
    features = (16.0, 1.0, 1.0, 16.0, 8.0 * elements)
    return Kernel("pad", "ReorderInput", "com.microsoft.nchwc", "reorder", features, ((1, elements),), ((1, elements),))


def test_the_predictor_takes_the_footprint_of_the_whole_kernel_list() -> None:
    # Gemm time per byte is ~3x higher when the network overflows a 4 MiB cache: the footprint must be learnt.
    cache = 4.0 * 2**20
    rng = np.random.default_rng(0)
    samples = []
    for i in range(80):
        kernel = _gemm(int(rng.integers(64, 512)), i)
        footprint = float(rng.choice([0.5, 1.0, 8.0, 16.0])) * 2**20
        per_byte = 1e-7 if footprint < cache else 3e-7
        ms = 0.002 + per_byte * kernel.features[-1]
        samples.append(KernelSample("gemm", "Gemm", kernel.features, ms, ms, f"n{i}", footprint))
    predictor = fit_kernel_predictor(samples, overhead_ms=0.0, block_size=16, cache_bytes=cache)
    assert predictor.cache_bytes == cache
    gemm = _gemm(300, 0)
    alone = predictor.predict([gemm])[0][0]
    in_big_network = predictor.predict([gemm, _padding(8.0)])[0][0]
    in_huge_network = predictor.predict([gemm, _padding(400.0)])[0][0]
    assert in_big_network > 2.0 * alone
    assert in_huge_network == in_big_network, "beyond the cache every footprint is the same"
    assert network_kernel_bytes([gemm, _padding(8.0)]) == gemm.features[-1] + 8.0 * 2**20

    restored = KernelPredictor.from_json(predictor.to_json())
    assert restored.cache_bytes == cache and restored.predict([gemm]) == predictor.predict([gemm])


def test_a_predictor_without_the_context_column_loads_and_predicts_as_before() -> None:
    rng = np.random.default_rng(1)
    samples = []
    for i in range(30):
        kernel = _gemm(int(rng.integers(64, 512)), i)
        ms = 0.002 + 1e-7 * kernel.features[-1]
        samples.append(KernelSample("gemm", "Gemm", kernel.features, ms, ms, f"n{i}", 2.0**20))
    old = fit_kernel_predictor(samples, overhead_ms=0.0, block_size=16, use_context=False)
    stored = {**old.to_json(), "format": 1}
    del stored["network_context"]  # what format 1 wrote
    restored = KernelPredictor.from_json(stored)
    assert restored.cache_bytes is None
    kernels = [_gemm(256, 0), _padding(64.0)]
    assert restored.predict(kernels) == old.predict(kernels)
    with pytest.raises(ValueError, match="format"):
        KernelPredictor.from_json({**stored, "format": 99})
