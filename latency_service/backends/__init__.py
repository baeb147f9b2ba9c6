"""Backend registry.  Modules are imported lazily so that a device image without TensorRT or torch still starts."""

from __future__ import annotations

import importlib
from typing import Any

from latency_service.backends.base import Backend, BackendStatus, BackendUnavailable, Runnable

# name -> "module:class"; one runtime per module.
BACKEND_PATHS: dict[str, str] = {
    "onnxruntime": "latency_service.backends.onnxruntime:OnnxRuntimeBackend",
    "litert": "latency_service.backends.litert:LiteRTBackend",
    "edgetpu": "latency_service.backends.edgetpu:EdgeTPUBackend",
    "tensorrt": "latency_service.backends.tensorrt:TensorRTBackend",
    "torch_cuda": "latency_service.backends.torch_cuda:TorchCudaBackend",
}


def backend_class(name: str) -> type[Backend]:
    """The class registered under ``name``; raises KeyError for an unknown name, BackendUnavailable on import."""
    path = BACKEND_PATHS[name]
    module_name, class_name = path.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:  # the module itself is ours; a failure here is a missing third-party runtime
        raise BackendUnavailable(f"{name}: cannot import {module_name}: {exc}") from exc
    cls: type[Backend] = getattr(module, class_name)
    return cls


def backend_statuses() -> list[BackendStatus]:
    statuses = []
    for name in BACKEND_PATHS:
        try:
            statuses.append(backend_class(name).status())
        except BackendUnavailable as exc:
            statuses.append(BackendStatus(name=name, available=False, reason=str(exc)))
    return statuses


def create_backend(name: str, **options: Any) -> Backend:
    """Instantiate an available backend; raises BackendUnavailable with the reason otherwise."""
    if name not in BACKEND_PATHS:
        raise KeyError(name)
    cls = backend_class(name)
    status = cls.status()
    if not status.available:
        raise BackendUnavailable(f"{name}: {status.reason}")
    return cls(**options)


__all__ = [
    "BACKEND_PATHS",
    "Backend",
    "BackendStatus",
    "BackendUnavailable",
    "Runnable",
    "backend_class",
    "backend_statuses",
    "create_backend",
]
