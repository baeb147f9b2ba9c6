"""torch-CUDA backend: the module builder runs on the CPU here (shapes and padding against the catalogue); timing
on a GPU skips here with the reason."""

from __future__ import annotations

import sys
from typing import Any

import pytest

from latency_service.backends import BackendUnavailable, create_backend
from latency_service.backends.torch_cuda import TorchCudaBackend
from predictors.ops import op_from_dict

torch = pytest.importorskip("torch", reason="torch is not installed")

from latency_service.backends.torch_cuda import build_torch_module, random_inputs  # noqa: E402

CATALOGUE = [
    {"op": "conv2d", "cin": 16, "cout": 24, "hw": 14, "k": 3, "stride": 2, "bn": True, "act": "relu6"},
    {"op": "conv2d", "cin": 16, "cout": 16, "hw": 15, "k": 5, "stride": 2, "groups": 16, "act": "hardswish"},
    {"op": "conv2d", "cin": 16, "cout": 32, "hw": 8, "k": 3, "groups": 4, "act": "silu"},
    {"op": "conv2d", "cin": 8, "cout": 8, "hw": 6, "k": 2},
    {"op": "linear", "cin": 64, "cout": 10, "batch": 3, "act": "sigmoid"},
    {"op": "batchnorm", "c": 8, "hw": 10},
    *({"op": act, "c": 8, "hw": 10} for act in ("relu", "relu6", "hardswish", "hardsigmoid", "sigmoid", "silu")),
    {"op": "maxpool", "c": 8, "hw": 10, "k": 2, "stride": 2},
    {"op": "avgpool", "c": 8, "hw": 9, "k": 3, "stride": 2},
    {"op": "global_avgpool", "c": 8, "hw": 10},
    {"op": "add", "c": 8, "hw": 10},
    {"op": "mul", "c": 8, "hw": 10},
    {"op": "concat", "cins": [8, 16, 4], "hw": 10},
    {"op": "channel_shuffle", "c": 12, "hw": 10, "groups": 3},
]


@pytest.mark.parametrize("spec", CATALOGUE, ids=lambda d: f"{d['op']}-{d.get('k') or d.get('act') or ''}")
def test_module_output_matches_catalogue_shape(spec: dict[str, Any]) -> None:
    op = op_from_dict(spec)
    module = build_torch_module(op)
    assert not module.training
    with torch.inference_mode():
        y = module(*random_inputs(op, seed=1))
    assert tuple(y.shape) == op.output_shape()
    assert torch.isfinite(y).all()


def test_channel_shuffle_interleaves_groups() -> None:
    op = op_from_dict({"op": "channel_shuffle", "c": 6, "hw": 1, "groups": 2})
    x = torch.arange(6.0).view(1, 6, 1, 1)
    assert build_torch_module(op)(x).flatten().tolist() == [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]


def test_importing_the_backend_does_not_import_torch() -> None:
    import subprocess

    modules = "latency_service.backends.torch_cuda, latency_service.backends.tensorrt"
    code = f"import sys, {modules}; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


gpu = TorchCudaBackend.status()


@pytest.mark.skipif(gpu.available, reason="a CUDA device is visible: the unavailable path cannot be observed")
def test_status_names_the_missing_cuda_device() -> None:
    assert gpu.reason is not None and "no CUDA device" in gpu.reason
    with pytest.raises(BackendUnavailable, match="torch_cuda: no CUDA device"):
        create_backend("torch_cuda")


@pytest.mark.skipif(not gpu.available, reason=f"torch_cuda unavailable: {gpu.reason}")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cuda_events_time_variants_on_the_gpu(precision: str) -> None:
    from latency_service.measurement import MeasurementConfig, measure

    backend = TorchCudaBackend(precision=precision)
    config = MeasurementConfig(min_runs=50, min_time_s=0.2)
    small = op_from_dict({"op": "conv2d", "cin": 32, "cout": 32, "hw": 28, "k": 1})
    large = op_from_dict({"op": "conv2d", "cin": 256, "cout": 512, "hw": 56, "k": 3, "act": "relu"})
    medians = [measure(backend.prepare_op(op), config).median_ms for op in (small, large)]
    assert 0 < medians[0] < medians[1]
    assert backend.environment()["gpu"]
    with pytest.raises(ValueError, match=r"^model:"):
        backend.prepare_model(b"\x08\x07")
