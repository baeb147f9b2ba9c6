"""Fitting a device class's operator predictors from the store (the service's ``POST /v1/predictors/fit`` and the
CLI's ``fit``)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from sqlalchemy.orm import Session

from latency_service import store
from latency_service.measurement_lock import MEASUREMENT_LOCK
from latency_service.models import Predictor


def _json_safe(value: Any) -> Any:
    """numpy scalars and arrays in fit reports as plain JSON numbers and lists."""
    return json.loads(json.dumps(value, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def fit_device_class(*, session: Session, device_id: str, device_class: str) -> Predictor:
    """Fit predictors on the latest measurements of every device of ``device_class`` and store them (not committed).

    Raises:
        LookupError: when nothing has been measured on this device class yet.
    """
    from predictors.fitting import fit_predictors

    samples = store.training_samples(session=session, device_class=device_class)
    if not samples:
        raise LookupError(f"nothing measured on device class {device_class} yet: run a profiling job first")
    # Fitting keeps both cores busy for seconds to minutes: no timing may run meanwhile, so it takes the same lock.
    with MEASUREMENT_LOCK:
        predictor, reports = fit_predictors(samples)
    return store.save_predictor(
        session=session,
        device_id=device_id,
        device_class=device_class,
        version=predictor.version,
        payload=_json_safe(predictor.to_json()),
        reports=[_json_safe(dataclasses.asdict(report)) for report in reports],
    )
