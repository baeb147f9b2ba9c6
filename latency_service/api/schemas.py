"""Pydantic models for the HTTP shapes of API v1.  Operator specs travel as plain objects (``{"op": kind, ...}``)
and are validated by ``predictors.ops.op_from_dict`` so that errors name the field the catalogue knows about."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

OpJson = dict[str, Any]
JobStatus = Literal["queued", "running", "done", "failed", "cancelled"]
Source = Literal["measured", "predicted"]


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class DevicePublic(BaseModel):
    device_id: str
    device_class: str
    backend: str
    backend_version: str
    host: dict[str, Any]


class BackendPublic(BaseModel):
    name: str
    available: bool
    reason: str | None = None


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ops: list[Any] | None = Field(default=None, description="Operator specs to measure, in order")
    preset: str | None = Field(default=None, description="A named grid instead of ops: smoke or standard")
    force: bool = Field(default=False, description="Measure again even variants this device already measured")

    @model_validator(mode="after")
    def _ops_or_preset(self) -> JobCreate:
        if (self.ops is None) == (self.preset is None):
            raise ValueError("give exactly one of ops and preset")
        return self


class JobCreated(BaseModel):
    id: int
    status: JobStatus
    total: int


class JobPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    status: JobStatus
    total: int
    done: int = Field(description="Items finished, including skipped ones")
    failed: int
    skipped: int = Field(default=0, description="Items not measured: measured before (without force) or cancelled")
    error: str | None
    force: bool
    preset: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class MeasurementPublic(BaseModel):
    op: OpJson
    key: str
    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    cv: float
    n: int
    flagged: bool
    flag_reason: str | None
    measured_at: datetime


class MeasurementPage(BaseModel):
    items: list[MeasurementPublic]
    total: int


class FitReportPublic(BaseModel):
    model_config = ConfigDict(extra="allow")

    op: str
    n_samples: int
    mape: float | None
    within_10pct: float | None
    model: str | None = None


class FitResponse(BaseModel):
    predictors: list[FitReportPublic]
    version: str
    samples: int


class PredictorPublic(BaseModel):
    version: str
    device_class: str
    created_at: datetime
    reports: list[FitReportPublic]


class OpsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ops: list[Any]


class PredictResponse(BaseModel):
    latency_ms: list[float]
    source: list[Source]
    total_ms: float
    predictor_version: str


class TableLayer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    op: Any = Field(description="conv2d or linear spec with the full widths")
    cin_counts: list[int]
    cout_counts: list[int]


class TablesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    layers: list[TableLayer]


class LatencyTable(BaseModel):
    latency_ms: list[list[float]] = Field(description="[i][j]: op resized to cin_counts[i], cout_counts[j]")


class TablesResponse(BaseModel):
    tables: list[LatencyTable]
    predictor_version: str
    device_id: str
