"""LiteRT (TensorFlow Lite) CPU backend: the ai-edge-litert interpreter with XNNPACK, variants built as .tflite.

Timing-relevant settings, all recorded by :meth:`LiteRTBackend.environment`:

- ``num_threads`` is passed explicitly (default 1): LiteRT's own default (-1) lets XNNPACK pick, which makes two
  devices of one class disagree.
- XNNPACK is LiteRT's default CPU delegate and what an Android/ARM deployment runs; ``xnnpack=False`` selects the
  builtin reference/optimised kernels instead (OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES).
- Inputs are set once with random data; the first invoke (XNNPACK packs weights lazily) runs at prepare time.
"""

from __future__ import annotations

import importlib.metadata
import time
from typing import Any

import numpy as np

from latency_service.backends.base import Backend, BackendStatus, BackendUnavailable, Runnable
from latency_service.backends.tflite_builder import build_identity_tflite, build_op_tflite, interpreter_class
from predictors.ops import OpSpec

TFLITE_IDENTIFIER = b"TFL3"


def litert_version() -> str | None:
    for distribution in ("ai-edge-litert", "tflite-runtime"):
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def is_tflite(payload: bytes) -> bool:
    """A TFLite flatbuffer carries the file identifier ``TFL3`` right after its root offset."""
    return len(payload) >= 8 and payload[4:8] == TFLITE_IDENTIFIER


def check_tflite_payload(payload: bytes) -> None:
    """Refuse anything but a .tflite flatbuffer, with the conversion the user needs when it is ONNX."""
    if is_tflite(payload):
        return
    if payload[:1] == b"\x08":  # every ONNX ModelProto starts with field 1 (ir_version) as a varint
        raise ValueError(
            "model: this is an ONNX model; LiteRT runs .tflite flatbuffers -- convert it first "
            "(litert-torch from PyTorch, or onnx2tf), then send the .tflite file"
        )
    raise ValueError("model: not a .tflite flatbuffer (missing the TFL3 file identifier)")


def random_feed(details: dict[str, Any], rng: np.random.Generator) -> np.ndarray:
    """Random data of the input's dtype: uniform [-1, 1) for floats, the whole range for integer inputs."""
    shape, dtype = tuple(details["shape"]), np.dtype(details["dtype"])
    if np.issubdtype(dtype, np.floating):
        return rng.uniform(-1.0, 1.0, shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)


class TFLiteRunnable:
    """An allocated interpreter whose inputs hold random data; ``time_once`` times one ``invoke()``."""

    def __init__(self, interpreter: Any, *, seed: int = 0, warm_invokes: int = 1) -> None:
        self._interpreter = interpreter
        interpreter.allocate_tensors()
        rng = np.random.default_rng(seed)
        for details in interpreter.get_input_details():
            interpreter.set_tensor(details["index"], random_feed(details, rng))
        # The first invoke packs weights (XNNPACK) or loads the model into accelerator memory (Edge TPU).
        self.first_invoke_s = 0.0
        for _ in range(warm_invokes):
            start = time.perf_counter()
            interpreter.invoke()
            self.first_invoke_s = self.first_invoke_s or time.perf_counter() - start
        # Per-variant facts worth storing next to the measurement (the Edge TPU adds its compile report).
        self.details: dict[str, Any] = {"first_invoke_ms": round(self.first_invoke_s * 1e3, 4)}

    def time_once(self) -> float:
        start = time.perf_counter()
        self._interpreter.invoke()
        return time.perf_counter() - start

    def output(self) -> np.ndarray:
        details = self._interpreter.get_output_details()[0]
        return np.asarray(self._interpreter.get_tensor(details["index"]))

    def close(self) -> None:
        self._interpreter = None


class LiteRTBackend(Backend):
    """LiteRT on the CPU, XNNPACK delegate on by default."""

    name = "litert"

    def __init__(self, *, num_threads: int = 1, xnnpack: bool = True) -> None:
        status = self.status()
        if not status.available:
            raise BackendUnavailable(f"litert: {status.reason}")
        if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
            raise ValueError(f"num_threads: must be a positive integer, got {num_threads!r}")
        if not isinstance(xnnpack, bool):
            raise ValueError(f"xnnpack: must be a boolean, got {xnnpack!r}")
        self.num_threads = num_threads
        self.xnnpack = xnnpack

    @classmethod
    def status(cls) -> BackendStatus:
        try:
            interpreter_class()
        except ImportError as exc:
            reason = f"ai-edge-litert is not installed (pip install ai-edge-litert): {exc}"
            return BackendStatus(name=cls.name, available=False, reason=reason)
        return BackendStatus(name=cls.name, available=True)

    def environment(self) -> dict[str, Any]:
        return {
            "runtime": "litert",
            "runtime_version": litert_version() or "unknown",
            "num_threads": self.num_threads,
            "xnnpack": self.xnnpack,
            "model_format": "tflite float32 NHWC",
        }

    def interpreter(self, model: bytes) -> Any:
        try:
            from ai_edge_litert.interpreter import OpResolverType
        except ImportError:
            from tflite_runtime.interpreter import OpResolverType
        resolver = OpResolverType.AUTO if self.xnnpack else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        return interpreter_class()(
            model_content=model, num_threads=self.num_threads, experimental_op_resolver_type=resolver
        )

    def prepare_op(self, op: OpSpec) -> Runnable:
        model = build_op_tflite(op, seed=int(op.key[12:20], 16) % (1 << 31))
        return TFLiteRunnable(self.interpreter(model), seed=int(op.key[:8], 16))

    def prepare_model(self, onnx_model: bytes) -> Runnable:
        """Load a whole model; LiteRT needs it as .tflite, so an ONNX payload is refused with what to do."""
        check_tflite_payload(onnx_model)
        return TFLiteRunnable(self.interpreter(onnx_model))

    def prepare_empty(self) -> Runnable:
        return TFLiteRunnable(self.interpreter(build_identity_tflite()))


__all__ = ["LiteRTBackend", "TFLiteRunnable", "check_tflite_payload", "is_tflite", "litert_version", "random_feed"]
