"""The named operator grids, so that a farm can shard a preset across the services of one device class."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException

from latency_service.presets import PRESETS, UnknownPresetError, describe_preset, preset_ops

router = APIRouter(tags=["presets"])


@router.get("/v1/presets")
def list_presets() -> list[dict[str, Any]]:
    """Name, description, variant count and count per operator kind of every preset."""
    return [describe_preset(name) for name in PRESETS]


@router.get("/v1/presets/{name}")
def get_preset(name: str) -> dict[str, Any]:
    """A preset's operator specs, in measuring order (the same list on every machine)."""
    try:
        ops = preset_ops(name)
    except UnknownPresetError as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from exc
    return {"name": name, "description": PRESETS[name].description, "ops": [op.to_dict() for op in ops]}
