"""TensorRT backend: an engine per variant, built from the variant's ONNX with the TensorRT Python API.

What trtexec does for stable numbers, and how it maps here (all recorded by :meth:`TensorRTBackend.environment`):

- The engine is built once per variant (``Builder`` + ``OnnxParser`` + ``BuilderConfig``; fp32, ``fp16`` flag,
  optional ``int8`` with placeholder dynamic ranges as ``trtexec --int8`` without a calibration cache).  Its build
  time is recorded on the runnable (``engine_build_s``) and as ``last_engine_build_s``, never inside a latency.
- Execution context, stream and device buffers are created at prepare time, outside the timed region.
- ``time_once`` brackets ``execute_async_v3`` with CUDA events on the engine's stream and synchronises the end event
  (enqueue is asynchronous).  ``spin_wait`` polls the event instead of blocking (``--useSpinWait``); ``cuda_graph``
  captures the enqueue once and replays the graph (``--useCudaGraph``), removing the per-launch host cost.
- No host/device copies are timed (``--noDataTransfers``): inputs are written once on the device.
- Device buffers, events and streams come from torch (CUDA build), which the GPU image ships.
"""

from __future__ import annotations

import importlib.util
import time
from typing import Any

from latency_service.backends.base import Backend, BackendStatus, BackendUnavailable, Runnable
from latency_service.backends.onnx_graphs import build_identity_model, build_op_model
from latency_service.backends.torch_cuda import CudaEventRunnable, cuda_status
from predictors.ops import OpSpec

PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8")
# Placeholder range for every tensor when int8 is asked for without calibration data: kernels and their speed do
# not depend on the range, only accuracy does, and accuracy is not measured here.
_INT8_PLACEHOLDER_RANGE = 4.0


class TensorRTBuildError(ValueError):
    """The ONNX parser or the builder refused the model; the message carries TensorRT's own errors."""


class TensorRTBackend(Backend):
    """An NVIDIA GPU through TensorRT engines."""

    name = "tensorrt"

    def __init__(
        self,
        *,
        precision: str = "fp32",
        workspace_mib: int = 1024,
        builder_optimization_level: int = 3,
        cuda_graph: bool = False,
        spin_wait: bool = False,
        device_index: int = 0,
    ) -> None:
        status = self.status()
        if not status.available:
            raise BackendUnavailable(f"tensorrt: {status.reason}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision: must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if not 0 <= builder_optimization_level <= 5:
            raise ValueError(f"builder_optimization_level: must be 0..5, got {builder_optimization_level}")
        import tensorrt as trt
        import torch

        self.precision = precision
        self.workspace_mib = workspace_mib
        self.builder_optimization_level = builder_optimization_level
        self.cuda_graph = cuda_graph
        self.spin_wait = spin_wait
        self.device = torch.device("cuda", device_index)
        torch.cuda.set_device(self.device)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.last_engine_build_s: float | None = None

    @classmethod
    def status(cls) -> BackendStatus:
        if importlib.util.find_spec("tensorrt") is None:
            return BackendStatus(
                name=cls.name,
                available=False,
                reason="the tensorrt Python package is not installed (NVIDIA's wheels or the "
                "nvcr.io/nvidia/tensorrt image; PyPI's sdist only pulls them on a CUDA host)",
            )
        try:
            import tensorrt  # noqa: F401  (a placeholder or a wheel without its libraries fails here)
        except (ImportError, OSError) as exc:
            return BackendStatus(name=cls.name, available=False, reason=f"tensorrt does not import: {exc}")
        gpu = cuda_status(cls.name)
        if not gpu.available:
            return BackendStatus(name=cls.name, available=False, reason=f"{gpu.reason}; tensorrt needs a CUDA device")
        return gpu

    def environment(self) -> dict[str, Any]:
        import tensorrt as trt
        import torch

        return {
            "runtime": "tensorrt",
            "runtime_version": trt.__version__,
            "cuda_version": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(self.device),
            "precision": self.precision,
            "workspace_mib": self.workspace_mib,
            "builder_optimization_level": self.builder_optimization_level,
            "cuda_graph": self.cuda_graph,
            "spin_wait": self.spin_wait,
            "data_transfers_timed": False,
            "timer": "cuda events",
            "last_engine_build_s": self.last_engine_build_s,
        }

    def build_engine(self, onnx_model: bytes) -> tuple[Any, float]:
        """Parse and build; returns the deserialised engine and the seconds the build took."""
        import tensorrt as trt

        builder = trt.Builder(self._logger)
        # EXPLICIT_BATCH is the only mode since TensorRT 10 and must be asked for on 8.x.
        flags = (
            0
            if int(trt.__version__.split(".")[0]) >= 10
            else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
        )
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, self._logger)
        if not parser.parse(onnx_model):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise TensorRTBuildError(f"model: the TensorRT ONNX parser refused it: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace_mib << 20)
        config.builder_optimization_level = self.builder_optimization_level
        if self.precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)  # int8 engines fall back to fp16, not fp32, where int8 has no kernel
        if self.precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
            for i in range(network.num_inputs):
                network.get_input(i).set_dynamic_range(-_INT8_PLACEHOLDER_RANGE, _INT8_PLACEHOLDER_RANGE)
            for i in range(network.num_layers):
                layer = network.get_layer(i)
                for j in range(layer.num_outputs):
                    layer.get_output(j).set_dynamic_range(-_INT8_PLACEHOLDER_RANGE, _INT8_PLACEHOLDER_RANGE)
        start = time.perf_counter()
        serialized = builder.build_serialized_network(network, config)
        build_s = time.perf_counter() - start
        if serialized is None:
            raise TensorRTBuildError("model: TensorRT could not build an engine (see the service log for why)")
        engine = self._runtime.deserialize_cuda_engine(serialized)
        self.last_engine_build_s = build_s
        return engine, build_s

    def _runnable(self, onnx_model: bytes, seed: int = 0) -> Runnable:
        import tensorrt as trt
        import torch

        engine, build_s = self.build_engine(onnx_model)
        context = engine.create_execution_context()
        stream = torch.cuda.Stream(device=self.device)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        buffers: list[torch.Tensor] = []  # kept alive for as long as the context points at them
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            shape = tuple(max(d, 1) for d in engine.get_tensor_shape(name))
            dtype = getattr(torch, trt.nptype(engine.get_tensor_dtype(name)).__name__)
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                if tuple(engine.get_tensor_shape(name)) != shape:
                    context.set_input_shape(name, shape)  # symbolic dims become 1: batch-1 profiling
                buffer = torch.randn(shape, generator=generator).to(self.device, dtype)
            else:
                buffer = torch.empty(shape, dtype=dtype, device=self.device)
            buffers.append(buffer)
            context.set_tensor_address(name, buffer.data_ptr())

        def enqueue() -> None:
            if not context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError("tensorrt: execute_async_v3 failed")

        call = enqueue
        with torch.cuda.stream(stream):
            enqueue()  # TensorRT sets up per-context state on the first enqueue; graph capture must come after it
            stream.synchronize()
            if self.cuda_graph:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=stream):
                    enqueue()
                call = graph.replay
        runnable = _TensorRTRunnable(call, stream, spin_wait=self.spin_wait)
        runnable.engine_build_s = build_s
        runnable.details = {"engine_build_s": round(build_s, 4), "precision": self.precision}
        runnable.keepalive = (engine, context, buffers)
        return runnable

    def prepare_op(self, op: OpSpec) -> Runnable:
        return self._runnable(build_op_model(op).SerializeToString(), seed=int(op.key[:8], 16))

    def prepare_model(self, onnx_model: bytes) -> Runnable:
        return self._runnable(onnx_model)

    def prepare_empty(self) -> Runnable:
        return self._runnable(build_identity_model().SerializeToString())


class _TensorRTRunnable(CudaEventRunnable):
    """CUDA-event timing on the engine's own stream, with the engine and its buffers kept alive."""

    def __init__(self, call: Any, stream: Any, *, spin_wait: bool) -> None:
        super().__init__(call, spin_wait=spin_wait, stream=stream)
        self.engine_build_s = 0.0
        self.details: dict[str, Any] = {}
        self.keepalive: Any = None

    def close(self) -> None:
        super().close()
        self.keepalive = None


__all__ = ["PRECISIONS", "TensorRTBackend", "TensorRTBuildError"]
