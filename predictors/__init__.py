"""Operator catalogue and latency predictors shared by the latency service and the search client (no torch)."""

from predictors.fitting import FitReport, LatencyPredictor, UnmodelledOpError, fit_predictors
from predictors.ops import OPERATORS, OpSpec, OpSpecError, op_from_dict

__all__ = [
    "OPERATORS",
    "FitReport",
    "LatencyPredictor",
    "OpSpec",
    "OpSpecError",
    "UnmodelledOpError",
    "fit_predictors",
    "op_from_dict",
]
