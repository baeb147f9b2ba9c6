from __future__ import annotations

from fastapi import APIRouter

from latency_service import store
from latency_service.api.deps import ServiceDep, SessionDep
from latency_service.api.errors import ConflictError
from latency_service.api.schemas import FitReportPublic, FitResponse, PredictorPublic
from latency_service.device_fit import fit_device_class

router = APIRouter(tags=["predictors"])


@router.post("/v1/predictors/fit")
def fit(service: ServiceDep, session: SessionDep) -> FitResponse:
    """Fit per-kind predictors on this device class's latest measurements; the new version is used from now on."""
    try:
        row = fit_device_class(session=session, device_id=service.device_id, device_class=service.device_class)
    except LookupError as exc:
        raise ConflictError(f"{exc} (POST /v1/jobs)") from exc
    session.commit()
    reports = [FitReportPublic.model_validate(report) for report in row.reports]
    return FitResponse(predictors=reports, version=row.version, samples=sum(r.n_samples for r in reports))


@router.get("/v1/predictors")
def latest(service: ServiceDep, session: SessionDep) -> PredictorPublic:
    """The predictor in use: its version, when it was fitted and its cross-validated accuracy per kind."""
    row = store.latest_predictor(session=session, device_class=service.device_class)
    if row is None:
        raise ConflictError("no predictor has been fitted yet: POST /v1/predictors/fit after profiling")
    return PredictorPublic(
        version=row.version,
        device_class=row.device_class,
        created_at=row.created_at,
        reports=[FitReportPublic.model_validate(report) for report in row.reports],
    )
