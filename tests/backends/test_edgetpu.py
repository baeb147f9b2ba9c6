"""Edge TPU backend: the compiler-log parser on the compiler's real output format, device detection, the int8
artefact the compiler would receive; compilation and TPU timing skip here with the missing piece named."""

from __future__ import annotations

from pathlib import Path

import pytest

from latency_service.backends import BackendUnavailable, create_backend
from latency_service.backends.edgetpu import (
    COMPILER,
    EdgeTPUBackend,
    compile_for_edgetpu,
    parse_compiler_log,
    usb_accelerator_present,
)
from predictors.ops import op_from_dict

# stdout of `edgetpu_compiler -s` (v16) for a model whose tail the TPU cannot run.
PARTIAL_STDOUT = """\
Edge TPU Compiler version 16.0.384591198
Started a compilation timeout timer of 180 seconds.

Model compiled successfully in 412 ms.

Input model: variant.tflite
Input size: 20.52KiB
Output model: variant_edgetpu.tflite
Output size: 81.27KiB
On-chip memory used for caching model parameters: 22.25KiB
On-chip memory remaining for caching model parameters: 7.99MiB
Off-chip memory used for streaming uncached model parameters: 0.00B
Number of Edge TPU subgraphs: 1
Total number of operations: 5
Operation log: variant_edgetpu.log

Model successfully compiled but not all operations are supported by the Edge TPU. A percentage of the model will \
instead run on the CPU, which is slower. If possible, consider updating your model to use only operations supported \
by the Edge TPU. For details, visit g.co/coral/model-reqs.
Number of operations that will run on Edge TPU: 2
Number of operations that will run on CPU: 3

Operator                       Count      Status

CONV_2D                        1          Mapped to Edge TPU
LOGISTIC                       1          Mapped to Edge TPU
TRANSPOSE                      1          Operation not supported
RESHAPE                        2          More than one subgraph is not supported
Compilation child process completed within timeout period.
Compilation succeeded!
"""

# <model>_edgetpu.log as written next to the compiled model.
FULL_LOG = """\
Edge TPU Compiler version 16.0.384591198
Input: variant.tflite
Output: variant_edgetpu.tflite

Operator                       Count      Status

DEPTHWISE_CONV_2D              1          Mapped to Edge TPU
HARD_SWISH                     1          Mapped to Edge TPU
"""


def test_parser_counts_mapped_ops_and_cpu_fallbacks_with_reasons() -> None:
    report = parse_compiler_log(PARTIAL_STDOUT)
    assert report.compiler_version == "16.0.384591198"
    assert report.tpu_subgraphs == 1
    assert report.mapped == {"CONV_2D": 1, "LOGISTIC": 1}
    assert (report.ops_total, report.ops_mapped) == (5, 2)
    assert [(f.op, f.count, f.reason) for f in report.cpu_fallback] == [
        ("TRANSPOSE", 1, "Operation not supported"),
        ("RESHAPE", 2, "More than one subgraph is not supported"),
    ]
    assert not report.fully_mapped
    assert report.to_dict()["cpu_fallback"][0]["op"] == "TRANSPOSE"


def test_parser_reads_the_log_file_form() -> None:
    report = parse_compiler_log(FULL_LOG)
    assert report.fully_mapped and report.ops_total == report.ops_mapped == 2
    assert report.tpu_subgraphs is None


def test_parser_refuses_output_without_an_operation_table() -> None:
    with pytest.raises(ValueError, match="no 'Operator Count Status' table"):
        parse_compiler_log("Edge TPU Compiler version 16.0\nInvalid model: variant.tflite\nModel not quantized\n")


def _usb_device(root: Path, name: str, vendor: str, product: str) -> None:
    (root / name).mkdir()
    (root / name / "idVendor").write_text(vendor + "\n")
    (root / name / "idProduct").write_text(product + "\n")


@pytest.mark.parametrize(("vendor", "product", "found"), [("1a6e", "089a", True), ("18d1", "9302", True)])
def test_usb_accelerator_found_before_and_after_firmware_load(
    tmp_path: Path, vendor: str, product: str, found: bool
) -> None:
    _usb_device(tmp_path, "1-1", "1d6b", "0002")  # a root hub
    assert not usb_accelerator_present(tmp_path)
    _usb_device(tmp_path, "1-2", vendor, product)
    assert usb_accelerator_present(tmp_path) is found


def test_status_names_every_missing_piece_here() -> None:
    status = EdgeTPUBackend.status()
    if status.available:
        pytest.skip("an Edge TPU is attached: the unavailable path cannot be observed")
    assert status.reason is not None
    for piece in ("libedgetpu.so.1", COMPILER, "/dev/apex_0"):
        assert piece in status.reason
    with pytest.raises(BackendUnavailable, match="edgetpu: missing"):
        create_backend("edgetpu")


def test_int8_artefact_for_the_compiler_is_full_integer() -> None:
    tflite = pytest.importorskip("tflite", reason="the tflite schema package is not installed")
    pytest.importorskip("ai_edge_litert.interpreter", reason="ai-edge-litert is needed to calibrate int8 models")
    from latency_service.backends.tflite_builder import UnsupportedForTFLite, build_op_tflite

    op = op_from_dict({"op": "conv2d", "cin": 16, "cout": 16, "hw": 14, "k": 3, "groups": 16, "act": "hardswish"})
    graph = tflite.Model.GetRootAsModel(build_op_tflite(op, int8=True), 0).Subgraphs(0)
    float_types = {tflite.TensorType.FLOAT32, tflite.TensorType.FLOAT16}
    assert all(graph.Tensors(i).Type() not in float_types for i in range(graph.TensorsLength()))
    assert all(graph.Tensors(i).Quantization() is not None for i in range(graph.TensorsLength()))
    grouped = op_from_dict({"op": "conv2d", "cin": 16, "cout": 32, "hw": 8, "k": 3, "groups": 4})
    with pytest.raises(UnsupportedForTFLite, match=r"^groups:"):
        build_op_tflite(grouped, int8=True, allow_grouped_conv=False)


@pytest.mark.skipif(
    __import__("shutil").which(COMPILER) is not None, reason=f"{COMPILER} is installed: the refusal cannot be observed"
)
def test_compile_without_the_compiler_names_it() -> None:
    with pytest.raises(BackendUnavailable, match=COMPILER):
        compile_for_edgetpu(b"TFL3")


edgetpu = EdgeTPUBackend.status()


@pytest.mark.skipif(not edgetpu.available, reason=f"Edge TPU backend unavailable: {edgetpu.reason}")
def test_measures_on_the_tpu_excluding_the_loading_invoke() -> None:
    from latency_service.measurement import MeasurementConfig, measure

    backend = EdgeTPUBackend()
    op = op_from_dict({"op": "conv2d", "cin": 32, "cout": 64, "hw": 28, "k": 3, "act": "relu"})
    runnable = backend.prepare_op(op)
    report = backend.environment()["last_compile"]
    assert report is not None and report["mapped"].get("CONV_2D") == 1
    stats = measure(runnable, MeasurementConfig(min_runs=50, min_time_s=0.5))
    assert stats.median_ms > 0
    # The loading invoke copies the parameters into TPU memory and is far slower than a steady one.
    assert runnable.first_invoke_s * 1e3 > stats.median_ms  # type: ignore[attr-defined]
