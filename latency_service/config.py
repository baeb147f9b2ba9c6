"""Service settings: one pydantic-settings model, read from ``FIGS_*`` environment variables and CLI flags."""

from __future__ import annotations

import hashlib
import ipaddress
import os
import platform
import re
import socket
import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from latency_service.environment import host_environment
from latency_service.measurement import MeasurementConfig
from predictors.ops import DEFAULT_MAX_ELEMENTS

MEASUREMENT_FIELDS = (
    "warmup_runs",
    "warmup_s",
    "min_runs",
    "min_time_s",
    "max_runs",
    "max_time_s",
    "blocks",
    "cv_threshold",
    "spread_threshold",
    "max_attempts",
    "sessions",
    "contention_threshold",
    "realtime",
    "clock_patience_s",
)
# One per host, not per store: two processes timing on one CPU corrupt each other whatever database they write to.
DEFAULT_MEASURE_LOCK_PATH = str(Path(tempfile.gettempdir()) / "figs-measure.lock")
LOOPBACK_NAMES = frozenset({"localhost", "ip6-localhost", "ip6-loopback"})


def default_data_dir() -> Path:
    """``~/.local/share/figs`` when the home directory is writable (a normal user), else ``./data`` (containers)."""
    home = Path.home()
    if home.is_dir() and os.access(home, os.W_OK):
        return home / ".local" / "share" / "figs"
    return Path("data").resolve()


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Settings(BaseSettings):
    """Everything a latency service needs to know about where it runs and how it measures."""

    model_config = SettingsConfigDict(env_prefix="FIGS_", extra="ignore", validate_default=True)

    data_dir: Path = Field(default_factory=default_data_dir)
    db_url: str | None = Field(default=None, description="Any SQLAlchemy URL; default sqlite:///<data_dir>/latency.db")
    # SecretStr: settings get logged and printed; the token must not be.
    token: SecretStr | None = Field(default=None, description="Bearer token required on every route but /v1/health")
    insecure: bool = Field(default=False, description="Allow a non-loopback bind without a token")
    host: str = "127.0.0.1"
    port: int = Field(default=8400, ge=1, le=65535)

    backend: str = "onnxruntime"
    threads: int = Field(default=1, ge=1, description="Intra-op threads of the runtime")
    opt_level: Literal["disable", "basic", "extended", "all"] = "all"
    cores: Annotated[list[int] | None, NoDecode] = Field(default=None, description="CPU cores to pin to, e.g. 0,1")
    device_id: str | None = None
    device_class: str | None = None

    max_body_bytes: int = Field(default=4 << 20, ge=1024, description="Cap on JSON request bodies")
    max_model_bytes: int = Field(default=256 << 20, ge=1024, description="Cap on ONNX model uploads")
    max_elements: int = Field(default=DEFAULT_MAX_ELEMENTS, ge=1, description="Largest tensor a spec may describe")
    # About 40 µs per cell (building the resized spec dominates): a million cells answer in well under a minute.
    max_table_entries: int = Field(default=1_000_000, ge=1, description="Cap on cells in one /v1/tables request")

    # Measurement protocol overrides; None keeps latency_service.measurement.MeasurementConfig's default, so that
    # module stays the one place where the protocol's numbers are chosen.
    warmup_runs: int | None = Field(default=None, ge=0)
    warmup_s: float | None = Field(default=None, ge=0)
    min_runs: int | None = Field(default=None, ge=1)
    min_time_s: float | None = Field(default=None, ge=0)
    max_runs: int | None = Field(default=None, ge=1)
    max_time_s: float | None = Field(default=None, ge=0)
    blocks: int | None = Field(default=None, ge=1)
    cv_threshold: float | None = Field(default=None, ge=0)
    spread_threshold: float | None = Field(default=None, ge=0)
    max_attempts: int | None = Field(default=None, ge=1)
    # Independently built runtime sessions each variant and model is timed on (their medians' median is stored).
    sessions: int | None = Field(default=None, ge=1)
    # Seconds of in-context kernel profiling the standard preset spends after its operator grid (None: what the grid
    # left of the preset's 20 minutes, at most 480 s; kernel_profiling.in_context_budget).
    kernel_budget_s: float | None = Field(default=None, gt=0)
    # Busy cores seen from other processes above which a measurement is flagged "contention"; 0 switches it off.
    contention_threshold: float | None = Field(default=None, ge=0)
    # Real-time (SCHED_FIFO) priority for the timing thread where the OS allows it; FIGS_REALTIME=0 turns it off.
    realtime: bool | None = None
    # Reference-kernel gate (latency_service.clock_gate): samples taken while the machine ran slow are set aside.
    clock_gate: bool = True
    clock_tolerance: float = Field(default=0.04, gt=0, lt=1)
    # How long the gate waits for the fast state once enough samples of any state are in (None: the default).
    clock_patience_s: float | None = Field(default=None, ge=0)

    measure_lock_path: str | None = Field(
        default=DEFAULT_MEASURE_LOCK_PATH,
        description="Host-wide lock file that every measuring process takes; empty disables it",
    )
    poll_interval_s: float = Field(default=1.0, gt=0, description="How often an idle worker looks for new jobs")

    @field_validator("cores", mode="before")
    @classmethod
    def _parse_cores(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if not text:
                return None
            try:
                return [int(part) for part in text.strip("[]").split(",") if part.strip()]
            except ValueError as exc:
                raise ValueError(f"cores must be a comma-separated list of integers, got {value!r}") from exc
        return value

    @field_validator("cores")
    @classmethod
    def _check_cores(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and any(core < 0 for core in value):
            raise ValueError("cores must be non-negative")
        return value

    @field_validator("token")
    @classmethod
    def _empty_token_is_none(cls, value: SecretStr | None) -> SecretStr | None:
        return value if value is not None and value.get_secret_value() else None

    @model_validator(mode="after")
    def _refuse_open_bind(self) -> Settings:
        if not is_loopback(self.host) and not self.token and not self.insecure:
            raise ValueError(
                f"host: {self.host} is not a loopback address: set a token (FIGS_TOKEN / --token) "
                "or pass --insecure (FIGS_INSECURE=1) to serve it unauthenticated"
            )
        return self

    # ---- derived values -----------------------------------------------------------------------------------------
    def measurement_config(self) -> MeasurementConfig:
        """The protocol settings: MeasurementConfig's defaults, overridden field by field, plus the pinned cores."""
        overrides = {name: getattr(self, name) for name in MEASUREMENT_FIELDS if getattr(self, name) is not None}
        if overrides.get("contention_threshold") == 0:
            overrides["contention_threshold"] = None
        if self.max_time_s is None and self.min_time_s is not None:
            # A shortened min_time_s (tests, quick looks) must not trip the max >= min check of the default cap.
            overrides["max_time_s"] = max(self.min_time_s, MeasurementConfig.max_time_s)
        if self.max_runs is None and self.min_runs is not None:
            overrides["max_runs"] = max(self.min_runs, MeasurementConfig.max_runs)
        cores = tuple(self.cores) if self.cores else None
        return MeasurementConfig(**overrides, cores=cores)

    @property
    def database_url(self) -> str:
        if self.db_url:
            return self.db_url
        return f"sqlite:///{self.data_dir / 'latency.db'}"

    @property
    def resolved_device_id(self) -> str:
        """Stable across restarts: the same host and backend give the same id."""
        if self.device_id:
            return self.device_id
        host = socket.gethostname()
        digest = hashlib.sha256(f"{host}|{self.backend}".encode()).hexdigest()[:8]
        return f"{_slug(host)}-{self.backend}-{digest}"

    @property
    def resolved_device_class(self) -> str:
        """Devices that should share predictors: same CPU, architecture, backend and thread count."""
        if self.device_class:
            return self.device_class
        return (
            f"{_slug(str(host_environment()['cpu_model']))}-{platform.machine().lower()}-{self.backend}-t{self.threads}"
        )
