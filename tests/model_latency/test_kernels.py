"""Kernel decomposition of optimised graphs: onnx-helper models and both torch exporters."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from latency_service.kernel_generator import NetworkBuilder
from latency_service.kernel_profiling import optimise
from predictors.kernel_shapes import KernelDecompositionError
from predictors.kernels import FEATURE_NAMES, KERNEL_CLASSES, decompose


def _residual_model() -> onnx.ModelProto:
    b = NetworkBuilder(rng=np.random.default_rng(0), hw=16, in_channels=3)
    x = b.conv(b.input(), 16, k=3, act="relu")
    y = b.conv(b.conv(x, 32, k=3, act="relu"), 16, k=1)
    out = b.act(b.add(x, y), "relu")
    return b.build(b.linear(b.flatten(b.global_pool(out, reduce_mean=False)), 10))


def test_fusions_show_up_as_kernels(backend) -> None:
    kernels = decompose(optimise(backend, _residual_model().SerializeToString()))
    op_types = [k.op_type for k in kernels]
    assert "BatchNormalization" not in op_types, "BN should fold into the conv"
    assert "Relu" not in op_types, "ReLU should fuse into the conv"
    convs = [k for k in kernels if k.kernel_class == "conv"]
    assert len(convs) == 3
    assert "Relu" in convs[0].ops and "Relu" in convs[1].ops
    # The residual add and the ReLU after it both fuse into the last conv (its fourth input is the sum).
    assert set(convs[2].ops) >= {"Add", "Relu"}, convs[2].ops
    assert any(k.kernel_class == "reorder" for k in kernels)
    assert kernels[-1].output_shapes[0] == (1, 10)
    for kernel in kernels:
        assert kernel.kernel_class in KERNEL_CLASSES
        assert len(kernel.features) == len(FEATURE_NAMES[kernel.kernel_class])


def test_shapes_match_the_runtime_profiler(backend, tmp_path: Path) -> None:
    import onnxruntime as ort

    from latency_service.backends.onnx_graphs import random_inputs

    model = _residual_model()
    options = backend.session_options()
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "p")
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    session.run(None, random_inputs(model))
    events = json.loads(Path(session.end_profiling()).read_text())
    runtime_shapes = {
        e["name"][: -len("_kernel_time")]: tuple(e["args"]["output_type_shape"][0]["float"])
        for e in events
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
    }
    kernels = decompose(onnx.load(str(tmp_path / "opt.onnx")))
    assert {k.name for k in kernels} == set(runtime_shapes)
    for kernel in kernels:
        assert kernel.output_shapes[0] == runtime_shapes[kernel.name], kernel.name


def export_torch(model: Any, resolution: int, *, dynamo: bool) -> bytes:
    """Both torch.onnx.export paths: TorchScript at opset 17, or the default dynamo exporter."""
    import io
    import logging
    import warnings

    import torch

    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    x = torch.randn(1, 3, resolution, resolution)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
            assert program is not None
            return bytes(program.model_proto.SerializeToString())
        buffer = io.BytesIO()
        torch.onnx.export(model, (x,), buffer, dynamo=False, opset_version=17)  # type: ignore[arg-type]
        return buffer.getvalue()


class _SmallNet:
    @staticmethod
    def build() -> Any:
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish())
                self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1, groups=16), nn.ReLU6())
                self.se1, self.se2 = nn.Conv2d(16, 8, 1), nn.Conv2d(8, 16, 1)
                self.branch = nn.Sequential(nn.Conv2d(8, 8, 1), nn.SiLU())
                self.head = nn.Linear(16, 10)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                x = self.stem(x)
                x = x + self.dw(x)
                x = x * torch.sigmoid(self.se2(torch.relu(self.se1(x.mean((2, 3), keepdim=True)))))
                left, right = x.chunk(2, dim=1)
                x = torch.cat([left, self.branch(right)], 1)
                x = x.view(1, 2, 8, 16, 16).transpose(1, 2).reshape(1, 16, 16, 16)
                return self.head(nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))

        return Net().eval()


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_torch_exports_decompose_completely(backend, dynamo: bool) -> None:
    pytest.importorskip("torch")
    if dynamo:
        pytest.importorskip("onnxscript")
    model_bytes = export_torch(_SmallNet.build(), 32, dynamo=dynamo)
    kernels = decompose(optimise(backend, model_bytes))
    assert [k for k in kernels if k.kernel_class is None] == []
    classes = {k.kernel_class for k in kernels}
    assert {"conv", "gemm", "concat"} <= classes
    assert kernels[-1].output_shapes[0] == (1, 10)


def test_an_op_without_a_shape_rule_names_its_node() -> None:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, 8, 8])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    node = onnx.helper.make_node("LRN", ["x"], ["y"], name="lrn_node", size=3)
    model = onnx.helper.make_model(onnx.helper.make_graph([node], "g", [x], [y]))
    with pytest.raises(KernelDecompositionError, match="lrn_node"):
        decompose(model)
    kernels = decompose(model, known_shapes={"y": (1, 4, 8, 8)})
    assert kernels[0].kernel_class is None and kernels[0].output_shapes == ((1, 4, 8, 8),)
