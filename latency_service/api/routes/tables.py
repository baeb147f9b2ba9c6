"""Latency tables over channel counts: what the search client turns into an exact expected latency."""

from __future__ import annotations

from fastapi import APIRouter

from latency_service.api.deps import ServiceDep, SessionDep
from latency_service.api.errors import FieldError, Loc, parse_op
from latency_service.api.schemas import LatencyTable, TableLayer, TablesRequest, TablesResponse
from predictors.ops import Conv2d, Linear, OpSpec

router = APIRouter(tags=["tables"])


def _check_counts(counts: list[int], full: int, loc: Loc) -> None:
    if not counts:
        raise FieldError(loc, "must list at least one channel count")
    for index, count in enumerate(counts):
        if count < 1 or count > full:
            raise FieldError((*loc, index), f"channel count {count} is outside 1..{full} (the full width)")


def _layer_ops(layer: TableLayer, index: int, max_elements: int) -> list[OpSpec]:
    """The resized variants of one layer, row-major over (cin_counts, cout_counts)."""
    loc: Loc = ("body", "layers", index)
    op = parse_op(layer.op, max_elements=max_elements, loc=(*loc, "op"))
    if not isinstance(op, Conv2d | Linear):
        raise FieldError((*loc, "op", "op"), f"tables are for conv2d and linear layers, not {op.kind}")
    _check_counts(layer.cin_counts, op.cin, (*loc, "cin_counts"))
    _check_counts(layer.cout_counts, op.cout, (*loc, "cout_counts"))
    if isinstance(op, Conv2d) and op.depthwise and layer.cin_counts != layer.cout_counts:
        # A depthwise conv has one width: resized() follows cout, so a different cin grid would be silently ignored.
        raise FieldError((*loc, "cin_counts"), "a depthwise conv needs cin_counts equal to cout_counts")
    return [op.resized(cin, cout) for cin in layer.cin_counts for cout in layer.cout_counts]


@router.post("/v1/tables")
def tables(body: TablesRequest, service: ServiceDep, session: SessionDep) -> TablesResponse:
    """Predicted latency of every gated layer at every (active input, active output) channel count."""
    if not body.layers:
        raise FieldError(("body", "layers"), "must list at least one layer")
    cells = sum(len(layer.cin_counts) * len(layer.cout_counts) for layer in body.layers)
    if cells > service.settings.max_table_entries:
        raise FieldError(
            ("body", "layers"), f"{cells} table cells exceed the cap of {service.settings.max_table_entries}"
        )
    per_layer = [_layer_ops(layer, i, service.settings.max_elements) for i, layer in enumerate(body.layers)]
    predictor, version = service.predictor(session)
    # One vectorised call for every cell of every layer: the regressors' per-call overhead dominates small tables.
    latency = predictor.predict_ms([op for ops in per_layer for op in ops])
    out: list[LatencyTable] = []
    start = 0
    for layer in body.layers:
        rows, cols = len(layer.cin_counts), len(layer.cout_counts)
        grid = latency[start : start + rows * cols].reshape(rows, cols)
        out.append(LatencyTable(latency_ms=grid.tolist()))
        start += rows * cols
    return TablesResponse(tables=out, predictor_version=version, device_id=service.device_id)
