"""Typed request errors and the one place that maps every domain error to an HTTP status.

422 bodies use FastAPI's own validation shape (``{"detail": [{"loc": [...], "msg": ..., "type": ...}]}``) so that a
client handles a bad operator field exactly like a bad JSON type.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from latency_service.backends import BackendUnavailable
from latency_service.job_store import JobNotFoundError
from latency_service.presets import UnknownPresetError
from predictors.fitting import UnmodelledOpError
from predictors.ops import OpSpec, OpSpecError, op_from_dict

Loc = tuple[str | int, ...]


class FieldError(ValueError):
    """A request field is invalid; ``loc`` is its path in the request, e.g. ("body", "ops", 3, "cin")."""

    def __init__(self, loc: Loc, message: str) -> None:
        super().__init__(f"{'.'.join(map(str, loc))}: {message}")
        self.loc = loc
        self.message = message


class ConflictError(RuntimeError):
    """The request is valid but the service is not in a state to answer it (409), e.g. no predictor fitted yet."""


def parse_ops(raw_ops: Sequence[Any], *, max_elements: int, loc: Loc = ("body", "ops")) -> list[OpSpec]:
    """Validate every operator spec of a request, naming the first bad one by index and field."""
    if not raw_ops:
        raise FieldError(loc, "must list at least one operator")
    return [parse_op(raw, max_elements=max_elements, loc=(*loc, index)) for index, raw in enumerate(raw_ops)]


def parse_op(raw: Any, *, max_elements: int, loc: Loc) -> OpSpec:
    try:
        return op_from_dict(raw, max_elements=max_elements)
    except OpSpecError as exc:
        raise FieldError((*loc, exc.field), exc.message) from exc


def _validation_error(loc: Loc, message: str, kind: str = "value_error") -> JSONResponse:
    return JSONResponse(status_code=422, content={"detail": [{"loc": list(loc), "msg": message, "type": kind}]})


def _detail(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": message, **extra})


async def _field_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, FieldError)
    return _validation_error(exc.loc, exc.message)


async def _op_spec_error(_request: Request, exc: Exception) -> JSONResponse:
    # Only reached when a route parsed a spec without parse_op; the field is still named.
    assert isinstance(exc, OpSpecError)
    return _validation_error(("body", exc.field), exc.message)


async def _unknown_preset(_request: Request, exc: Exception) -> JSONResponse:
    return _validation_error(("body", "preset"), str(exc))


async def _job_not_found(_request: Request, exc: Exception) -> JSONResponse:
    return _detail(404, str(exc))


async def _unmodelled(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, UnmodelledOpError)
    kind = getattr(exc, "kind", None)
    return _detail(409, f"no predictor models operator kind {kind!r}: profile some variants of it and refit", kind=kind)


async def _conflict(_request: Request, exc: Exception) -> JSONResponse:
    return _detail(409, str(exc))


async def _backend_unavailable(_request: Request, exc: Exception) -> JSONResponse:
    return _detail(503, f"backend unavailable: {exc}")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(FieldError, _field_error)
    app.add_exception_handler(OpSpecError, _op_spec_error)
    app.add_exception_handler(UnknownPresetError, _unknown_preset)
    app.add_exception_handler(JobNotFoundError, _job_not_found)
    app.add_exception_handler(UnmodelledOpError, _unmodelled)
    app.add_exception_handler(ConflictError, _conflict)
    app.add_exception_handler(BackendUnavailable, _backend_unavailable)
