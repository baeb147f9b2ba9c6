"""torch-CUDA backend, for GPUs without TensorRT: the variant as a torch module, timed with CUDA events.

torch is imported lazily: the CPU and Edge TPU device images carry no torch, and importing this module (to list the
backends) must not need it.  Timing-relevant settings, recorded by :meth:`TorchCudaBackend.environment`:

- ``precision`` (fp32 or fp16): module and inputs are cast; TF32 matmul/conv is left at torch's defaults and
  recorded, since it changes conv and linear times by up to ~2x on Ampere and later.
- ``cudnn_benchmark``: cuDNN autotunes the algorithm per shape on the first call (excluded: prepare runs it).
- ``channels_last``: NHWC memory format, which Tensor Core convolutions prefer.
- CUDA events bracket the call on the current stream; the end event is synchronised before reading the time.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any

from latency_service.backends.base import Backend, BackendStatus, BackendUnavailable, Runnable
from predictors.ops import (
    Add,
    AvgPool,
    BatchNorm,
    ChannelShuffle,
    Concat,
    Conv2d,
    GlobalAvgPool,
    Linear,
    MaxPool,
    Mul,
    OpSpec,
    OpSpecError,
)

if TYPE_CHECKING:
    import torch

PRECISIONS: tuple[str, ...] = ("fp32", "fp16")


def cuda_status(name: str) -> BackendStatus:
    """Available when torch imports and sees a CUDA device; the reason names whichever is missing."""
    if importlib.util.find_spec("torch") is None:
        return BackendStatus(name=name, available=False, reason="torch is not installed (needs a CUDA build of torch)")
    import torch

    if not torch.cuda.is_available():
        build = f"torch {torch.__version__}, CUDA build {torch.version.cuda or 'none (CPU-only wheel)'}"
        return BackendStatus(name=name, available=False, reason=f"no CUDA device visible ({build})")
    return BackendStatus(name=name, available=True)


def build_torch_module(op: OpSpec) -> torch.nn.Module:
    """An eval-mode module computing ``op`` in NCHW, with the catalogue's padding (k // 2) and fusions unfused."""
    from torch import nn

    activations: dict[str, type[nn.Module]] = {
        "relu": nn.ReLU,
        "relu6": nn.ReLU6,
        "hardswish": nn.Hardswish,
        "hardsigmoid": nn.Hardsigmoid,
        "sigmoid": nn.Sigmoid,
        "silu": nn.SiLU,
    }

    def activation(act: str | None) -> list[nn.Module]:
        return [activations[act]()] if act else []

    module: nn.Module
    if isinstance(op, Conv2d):
        conv = nn.Conv2d(op.cin, op.cout, op.k, op.stride, op.k // 2, groups=op.groups, bias=not op.bn)
        module = nn.Sequential(conv, *([nn.BatchNorm2d(op.cout)] if op.bn else []), *activation(op.act))
    elif isinstance(op, Linear):
        module = nn.Sequential(nn.Linear(op.cin, op.cout), *activation(op.act))
    elif isinstance(op, BatchNorm):
        module = nn.BatchNorm2d(op.c)
    elif isinstance(op, MaxPool):
        module = nn.MaxPool2d(op.k, op.stride, op.k // 2)
    elif isinstance(op, AvgPool):
        module = nn.AvgPool2d(op.k, op.stride, op.k // 2)
    elif isinstance(op, GlobalAvgPool):
        module = nn.AdaptiveAvgPool2d(1)
    elif isinstance(op, Add | Mul | Concat | ChannelShuffle):
        module = _multi_input_module(op)
    elif op.kind in activations:
        module = activations[op.kind]()
    else:
        raise OpSpecError("op", f"no torch module for operator kind {op.kind!r}")
    return module.eval()


def _multi_input_module(op: OpSpec) -> torch.nn.Module:
    """Ops with several inputs or a reshape, which have no single nn layer (a local class keeps torch lazy)."""
    import torch

    class MultiInput(torch.nn.Module):
        def forward(self, *xs: torch.Tensor) -> torch.Tensor:
            if isinstance(op, Add):
                return xs[0] + xs[1]
            if isinstance(op, Mul):
                return xs[0] * xs[1]
            if isinstance(op, Concat):
                return torch.cat(xs, dim=1)
            assert isinstance(op, ChannelShuffle)
            b, c, h, w = xs[0].shape
            return xs[0].view(b, op.groups, c // op.groups, h, w).transpose(1, 2).reshape(b, c, h, w)

    return MultiInput()


def random_inputs(op: OpSpec, *, device: str = "cpu", dtype: Any = None, seed: int = 0) -> list[torch.Tensor]:
    import torch

    generator = torch.Generator(device="cpu").manual_seed(seed)
    return [
        torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype or torch.float32)
        for shape in op.input_shapes()
    ]


class CudaEventRunnable:
    """A callable on the GPU with inputs resident; ``time_once`` returns CUDA-event seconds after synchronising."""

    def __init__(self, call: Any, *, spin_wait: bool = False, stream: Any = None) -> None:
        import torch

        self._torch = torch
        self._call = call
        self._spin_wait = spin_wait
        # Blocking events yield the CPU while waiting; spin-waiting (trtexec --useSpinWait) polls instead and shaves
        # the wake-up latency off the host side, which matters for kernels of a few microseconds.
        self._start = torch.cuda.Event(enable_timing=True, blocking=not spin_wait)
        self._end = torch.cuda.Event(enable_timing=True, blocking=not spin_wait)
        self._stream = stream if stream is not None else torch.cuda.current_stream()
        with torch.cuda.stream(self._stream):
            call()  # first call: cuDNN autotuning, lazy module loading, allocator growth
        torch.cuda.synchronize()

    def time_once(self) -> float:
        # Work, graph replays and both events all go to one stream, else the events bracket nothing.
        with self._torch.cuda.stream(self._stream):
            self._start.record(self._stream)
            self._call()
            self._end.record(self._stream)
        if self._spin_wait:
            while not self._end.query():
                pass
        else:
            self._end.synchronize()
        return float(self._start.elapsed_time(self._end)) / 1e3

    def close(self) -> None:
        self._call = None


class TorchCudaBackend(Backend):
    """A CUDA GPU through PyTorch eager mode (cuDNN / cuBLAS kernels)."""

    name = "torch_cuda"

    def __init__(
        self,
        *,
        precision: str = "fp32",
        cudnn_benchmark: bool = True,
        channels_last: bool = False,
        spin_wait: bool = False,
        device_index: int = 0,
    ) -> None:
        status = self.status()
        if not status.available:
            raise BackendUnavailable(f"torch_cuda: {status.reason}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision: must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        import torch

        self.precision = precision
        self.cudnn_benchmark = cudnn_benchmark
        self.channels_last = channels_last
        self.spin_wait = spin_wait
        self.device = torch.device("cuda", device_index)
        torch.backends.cudnn.benchmark = cudnn_benchmark

    @classmethod
    def status(cls) -> BackendStatus:
        return cuda_status(cls.name)

    def environment(self) -> dict[str, Any]:
        import torch

        props = torch.cuda.get_device_properties(self.device)
        return {
            "runtime": "torch_cuda",
            "runtime_version": torch.__version__,
            "cuda_version": torch.version.cuda,
            "cudnn_version": torch.backends.cudnn.version(),
            "gpu": props.name,
            "compute_capability": f"{props.major}.{props.minor}",
            "precision": self.precision,
            "cudnn_benchmark": self.cudnn_benchmark,
            "channels_last": self.channels_last,
            "allow_tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "allow_tf32_cudnn": torch.backends.cudnn.allow_tf32,
            "spin_wait": self.spin_wait,
            "timer": "cuda events",
        }

    def _dtype(self) -> Any:
        import torch

        return torch.float16 if self.precision == "fp16" else torch.float32

    def prepare_op(self, op: OpSpec) -> Runnable:
        import torch

        module = build_torch_module(op).to(self.device, self._dtype())
        inputs = random_inputs(op, device=str(self.device), dtype=self._dtype(), seed=int(op.key[:8], 16))
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
            inputs = [x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x for x in inputs]

        @torch.inference_mode()
        def call() -> None:
            module(*inputs)

        return CudaEventRunnable(call, spin_wait=self.spin_wait)

    def prepare_model(self, onnx_model: bytes) -> Runnable:
        raise ValueError(
            "model: the torch_cuda backend runs operator variants only; measure whole ONNX models with the "
            "tensorrt backend on this GPU"
        )

    def prepare_empty(self) -> Runnable:
        import torch

        # One tiny kernel launch: an empty call would time two back-to-back events and miss the launch cost.
        x = torch.randn(4, device=self.device)

        @torch.inference_mode()
        def call() -> None:
            torch.relu(x)

        return CudaEventRunnable(call, spin_wait=self.spin_wait)


__all__ = ["PRECISIONS", "CudaEventRunnable", "TorchCudaBackend", "build_torch_module", "cuda_status", "random_inputs"]
