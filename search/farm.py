"""`figs farm`: list the latency services of a device farm and shard a profiling grid across one device class.

The fan-out itself (sharding, polling, reassigning a dead service's share) lives in ``search.farm_fanout``; this
module is the command line: bad input exits 2 with one line, a farm where no service answers exits 3.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, NoReturn

import httpx
import typer
from rich.console import Console
from rich.table import Table

from predictors.ops import OpSpec, OpSpecError, op_from_dict
from search.farm_fanout import (
    Assignment,
    FarmError,
    FarmResult,
    Service,
    err_console,
    probe,
    read_farm_file,
    shard_and_wait,
)

farm_app = typer.Typer(help="Device farm: list services, shard profiling across a device class.", no_args_is_help=True)
console = Console()


def fail(message: str, code: int = 2) -> NoReturn:
    err_console.print(f"error: {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _services(file: Path | None, devices: list[str] | None, token: str | None) -> list[Service]:
    if file is None and not devices:
        fail("devices: give --file FARM.yaml or at least one --device URL")
    services = read_farm_file(file, token) if file is not None else []
    for index, url in enumerate(devices or []):
        if not url.startswith(("http://", "https://")):
            fail(f"device[{index}]: must be an http(s) URL, got {url!r}")
        services.append(Service(url=url, token=token))
    return services


FileOption = Annotated[Path | None, typer.Option("--file", help="Farm file (YAML or JSON) listing the services")]
DeviceOption = Annotated[list[str] | None, typer.Option("--device", help="A service URL (repeatable)")]
TokenOption = Annotated[str | None, typer.Option(envvar="FIGS_TOKEN", help="Bearer token of the services")]


@farm_app.command("list")
def list_services(file: FileOption = None, device: DeviceOption = None, token: TokenOption = None) -> None:
    """Each service's class, backend, queue and health."""
    try:
        services = [probe(s) for s in _services(file, device, token)]
    except ValueError as exc:
        fail(str(exc))
    table = Table("url", "device id", "class", "backend", "queue", "health")
    for s in services:
        if s.healthy:
            health = "[green]ok[/green]" + (f", [yellow]{s.problem}[/yellow]" if s.problem else "")
        else:
            health = f"[red]down[/red]: {s.problem}"
        table.add_row(s.url, s.device_id or "-", s.device_class or "-", s.backend or "-", str(s.queue), health)
    console.print(table)


def _read_ops(path: Path) -> list[OpSpec]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        fail(f"ops: cannot read {path} as JSON: {exc}")
    raw = data.get("ops") if isinstance(data, dict) else data
    if not isinstance(raw, list) or not raw:
        fail(f"ops: {path} must hold a non-empty list of operator specs (or {{'ops': [...]}})")
    ops = []
    for index, item in enumerate(raw):
        try:
            ops.append(op_from_dict(item))
        except OpSpecError as exc:
            fail(f"ops[{index}].{exc.field}: {exc.message}")
    return ops


def _preset_ops(service: Service, name: str) -> list[OpSpec]:
    with service.client() as client:
        response = client.get(f"/v1/presets/{name}")
    if response.status_code == 404:
        fail(f"preset: {service.url} has no preset {name!r} (or no /v1/presets endpoint); pass --ops FILE instead")
    response.raise_for_status()
    return [op_from_dict(item) for item in response.json()["ops"]]


@farm_app.command("profile")
def profile(
    device_class: Annotated[str | None, typer.Option("--class", help="Device class to profile")] = None,
    preset: Annotated[str | None, typer.Option(help="A named grid the services know (smoke, standard)")] = None,
    ops: Annotated[Path | None, typer.Option("--ops", help="JSON file with a list of operator specs")] = None,
    force: Annotated[bool, typer.Option(help="Measure again variants a service already measured")] = False,
    file: FileOption = None,
    device: DeviceOption = None,
    token: TokenOption = None,
    poll_s: Annotated[float, typer.Option(min=0.05, help="Seconds between polls")] = 0.5,
    down_after: Annotated[int, typer.Option(min=1, help="Failed polls before a service counts as down")] = 3,
    report: Annotated[Path | None, typer.Option(help="Write the final tally as JSON here")] = None,
) -> None:
    """Shard a grid across the healthy services of one class; reassign a dead service's unfinished variants."""
    if (preset is None) == (ops is None):
        fail("ops: give exactly one of --preset and --ops")
    grid = _read_ops(ops) if ops is not None else None  # bad input is reported before any network call
    try:
        services = [probe(s) for s in _services(file, device, token)]
    except ValueError as exc:
        fail(str(exc))
    if not any(s.healthy for s in services):
        fail("devices: no service answered: " + "; ".join(f"{s.url} {s.problem}" for s in services), code=3)
    classes = sorted({s.device_class for s in services if s.healthy and s.device_class})
    if device_class is None:
        if len(classes) != 1:
            fail(f"class: give --class; healthy services report {', '.join(classes) or 'no class'}")
        device_class = classes[0]
    members = [s for s in services if s.healthy and s.device_class == device_class]
    if not members:
        fail(f"class: no healthy service of class {device_class!r}; healthy classes: {', '.join(classes) or 'none'}")
    if grid is None:
        grid = _preset_ops(members[0], str(preset))
    try:
        result = shard_and_wait(members, grid, force=force, poll_s=poll_s, down_after=down_after)
    except FarmError as exc:
        fail(str(exc), code=3)
    except httpx.HTTPError as exc:
        fail(f"farm: {exc}", code=3)
    table = Table("service", "measured", "failed", "status", title=f"{result.total} variants of class {device_class}")
    for url, measured in result.measured_by.items():
        status = "[red]down[/red]" if url in result.down else "ok"
        table.add_row(url, str(len(measured)), str(result.failed_on[url]), status)
    console.print(table)
    if result.unmeasured:
        err_console.print(f"{len(result.unmeasured)} variants were not measured (failed on their service)")
    if report is not None:
        report.write_text(json.dumps(result.to_dict(), indent=2))


__all__ = ["Assignment", "FarmError", "FarmResult", "Service", "farm_app", "probe", "read_farm_file", "shard_and_wait"]
