"""onnxruntime CPU backend: one InferenceSession per variant, inputs and outputs pre-bound with IOBinding.

Timing-relevant session settings, all recorded by :meth:`OnnxRuntimeBackend.environment`:

- ``intra_op_num_threads`` is set explicitly (default 1).  0 would mean "all physical cores" and ignore a later
  ``taskset``; pin the process (``measurement.pin_to_cores``) *before* preparing a runnable with more than one
  thread, because the pool's threads take the affinity of the thread that creates the session.
- ``inter_op_num_threads`` 1 and sequential execution: the variants are single kernels or chains, and a parallel
  executor only adds scheduling jitter.
- Spinning is left at onnxruntime's default (``session.intra_op.allow_spinning`` = 1): with 1 thread there is no
  pool to spin, and with more threads spinning is what a latency-oriented deployment uses.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from latency_service.backends.base import Backend, BackendStatus, BackendUnavailable, Runnable
from latency_service.backends.onnx_graphs import build_identity_model, build_op_model, random_inputs
from predictors.ops import OpSpec

try:
    import onnxruntime as ort
except ImportError as _exc:  # the status names it; the module still imports so /v1/backends can list it
    ort = None
    _IMPORT_ERROR: str | None = str(_exc)
else:
    _IMPORT_ERROR = None

OPTIMIZATION_LEVELS: tuple[str, ...] = ("disable", "basic", "extended", "all")
_PROVIDER = "CPUExecutionProvider"
_ALLOW_SPINNING = True
# onnxruntime's type strings for graph inputs -> numpy dtypes, for binding random inputs of a user's model.
_ORT_TYPES: dict[str, type[np.generic]] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def _graph_level(name: str) -> Any:
    assert ort is not None
    return {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[name]


class OnnxRuntimeRunnable:
    """A loaded session whose inputs and outputs live in OrtValues bound once; ``time_once`` times only the run."""

    def __init__(self, session: Any, feeds: dict[str, np.ndarray], *, threads: int = 1) -> None:
        # Read by the measurement protocol: a caller timing under SCHED_FIFO would starve its own pool's workers.
        self.threads = threads
        self._session = session
        # OrtValues made from numpy arrays share their memory: keep the arrays alive as long as the binding.
        self._arrays = dict(feeds)
        self._binding = session.io_binding()
        for name, array in self._arrays.items():
            self._binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array, "cpu", 0))
        # Output shapes are only certain after a run (whole models may carry symbolic dims); this first run is also
        # the slow one (allocation, kernel selection) that no measurement should see.
        outputs = session.run(None, self._arrays)
        self._outputs: list[np.ndarray] = [np.empty_like(np.asarray(out)) for out in outputs]
        for meta, array in zip(session.get_outputs(), self._outputs, strict=True):
            self._binding.bind_ortvalue_output(meta.name, ort.OrtValue.ortvalue_from_numpy(array, "cpu", 0))
        self._binding.synchronize_inputs()

    @property
    def input_arrays(self) -> dict[str, np.ndarray]:
        return self._arrays

    @property
    def output_arrays(self) -> list[np.ndarray]:
        """The pre-allocated output buffers; they hold the last run's results."""
        return self._outputs

    def time_once(self) -> float:
        start = time.perf_counter()
        self._session.run_with_iobinding(self._binding)
        return time.perf_counter() - start

    def close(self) -> None:
        self._binding.clear_binding_inputs()
        self._binding.clear_binding_outputs()
        self._session = None
        self._arrays = {}
        self._outputs = []


class OnnxRuntimeBackend(Backend):
    """onnxruntime on the CPU execution provider."""

    name = "onnxruntime"

    def __init__(self, *, intra_op_threads: int = 1, optimization_level: str = "all") -> None:
        if ort is None:
            raise BackendUnavailable(f"onnxruntime: {_IMPORT_ERROR}")
        if isinstance(intra_op_threads, bool) or not isinstance(intra_op_threads, int) or intra_op_threads < 1:
            raise ValueError(f"intra_op_threads: must be a positive integer, got {intra_op_threads!r}")
        if optimization_level not in OPTIMIZATION_LEVELS:
            raise ValueError(
                f"optimization_level: must be one of {', '.join(OPTIMIZATION_LEVELS)}, got {optimization_level!r}"
            )
        self.intra_op_threads = intra_op_threads
        self.optimization_level = optimization_level

    @classmethod
    def status(cls) -> BackendStatus:
        if ort is None:
            return BackendStatus(
                name=cls.name, available=False, reason=f"onnxruntime is not installed: {_IMPORT_ERROR}"
            )
        if _PROVIDER not in ort.get_available_providers():
            return BackendStatus(name=cls.name, available=False, reason=f"onnxruntime lacks {_PROVIDER}")
        return BackendStatus(name=cls.name, available=True)

    def session_options(self) -> Any:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = _graph_level(self.optimization_level)
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if _ALLOW_SPINNING else "0")
        options.log_severity_level = 3
        return options

    def environment(self) -> dict[str, Any]:
        return {
            "runtime": "onnxruntime",
            "runtime_version": ort.__version__,
            "execution_provider": _PROVIDER,
            "intra_op_threads": self.intra_op_threads,
            "inter_op_threads": 1,
            "optimization_level": self.optimization_level,
            "execution_mode": "sequential",
            "allow_spinning": _ALLOW_SPINNING,
            "io_binding": True,
        }

    def _session(self, model_bytes: bytes) -> Any:
        return ort.InferenceSession(model_bytes, sess_options=self.session_options(), providers=[_PROVIDER])

    def _load(self, model_bytes: bytes, feeds: dict[str, np.ndarray]) -> OnnxRuntimeRunnable:
        return OnnxRuntimeRunnable(self._session(model_bytes), feeds, threads=self.intra_op_threads)

    def prepare_op(self, op: OpSpec) -> Runnable:
        model = build_op_model(op)
        return self._load(model.SerializeToString(), random_inputs(model, seed=int(op.key[12:20], 16)))

    def prepare_model(self, onnx_model: bytes) -> Runnable:
        """Load a user's model; anything onnx or onnxruntime refuses becomes a ValueError naming ``model``."""
        try:
            # The session's own view of the inputs: no second parse of a model that may weigh hundreds of MB.
            session = self._session(onnx_model)
            feeds = _random_session_inputs(session)
            return OnnxRuntimeRunnable(session, feeds, threads=self.intra_op_threads)
        except Exception as exc:  # protobuf's DecodeError, onnxruntime's InvalidGraph/Fail: one error for callers
            raise ValueError(f"model: onnxruntime cannot load it: {exc}") from exc

    def prepare_empty(self) -> Runnable:
        model = build_identity_model()
        return self._load(model.SerializeToString(), random_inputs(model))


def _random_session_inputs(session: Any, *, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs (never zeros) for every input the session expects; symbolic dimensions become 1 (batch 1)."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for meta in session.get_inputs():
        dtype = _ORT_TYPES.get(meta.type)
        if dtype is None:
            raise ValueError(f"model: input {meta.name!r} has unsupported type {meta.type}")
        shape = tuple(d if isinstance(d, int) and d > 0 else 1 for d in meta.shape)
        if np.issubdtype(dtype, np.floating):
            feeds[meta.name] = rng.standard_normal(size=shape).astype(dtype)
        else:
            # Small non-negative integers keep index-like inputs (gather ids, lengths) in range.
            feeds[meta.name] = rng.integers(0, 2 if dtype is np.bool_ else 8, size=shape).astype(dtype)
    return feeds


__all__ = ["OPTIMIZATION_LEVELS", "OnnxRuntimeBackend", "OnnxRuntimeRunnable"]
