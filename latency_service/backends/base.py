"""The interface every runtime backend implements.

A backend is split the nn-Meter way: it *builds* a runnable artefact for an operator variant (or a whole ONNX
model), hands back a :class:`Runnable` whose ``time_once`` runs it once and returns the seconds it took on the
backend's own clock, and *reports* its environment.  The measurement protocol (``latency_service.measurement``)
owns warm-up, repetition, statistics and noise flags; backends never compute statistics themselves.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from predictors.ops import OpSpec


class BackendUnavailable(RuntimeError):
    """The backend's runtime, driver or device is missing; the message names what is missing."""


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str | None = None


class Runnable(Protocol):
    """A built, loaded artefact with its inputs already bound (random data, not zeros)."""

    def time_once(self) -> float:
        """Run once and return the elapsed seconds on the backend's clock (perf_counter, CUDA events, ...)."""
        ...

    def close(self) -> None: ...


class Backend(ABC):
    """One runtime on one device.  Subclasses live one per module in ``latency_service/backends/``."""

    name: ClassVar[str]

    @classmethod
    @abstractmethod
    def status(cls) -> BackendStatus:
        """Whether this runtime can run here, and if not, a reason that names the missing piece."""

    @abstractmethod
    def environment(self) -> dict[str, Any]:
        """Runtime name and version plus every setting that changes timings (threads, optimisation level, ...)."""

    @abstractmethod
    def prepare_op(self, op: OpSpec) -> Runnable:
        """Build the artefact for one operator variant, load it and bind random inputs."""

    @abstractmethod
    def prepare_model(self, onnx_model: bytes) -> Runnable:
        """Load a whole ONNX model (static shapes, batch 1) and bind random inputs."""

    @abstractmethod
    def prepare_empty(self) -> Runnable:
        """The cheapest model the runtime can run (an identity): its time is the per-call overhead."""

    @property
    def runtime_version(self) -> str:
        return str(self.environment().get("runtime_version", "unknown"))
