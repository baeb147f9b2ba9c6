"""The farm fan-out engine behind `figs farm`: probe services, shard a grid over one device class, reassign.

Services are reached only over HTTP (httpx).  Each healthy service of the class gets an explicit op list as one
job; every poll reads each job's counters and which of its variants the service's ``/v1/measurements`` shows.  A
service that stops answering for ``down_after`` consecutive polls (or whose job fails) is declared down, and the
variants of its share not yet visible in its ``/v1/measurements`` at the last successful poll go to the surviving
services of the class.  A variant the dead service committed after that poll would be measured twice: polls run
every ``poll_s`` seconds while one variant takes at least the protocol's ``min_time_s``, which keeps that window small.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from predictors.ops import OpSpec

err_console = Console(stderr=True)
_TIMEOUT = httpx.Timeout(5.0, connect=2.0)
_MEASUREMENT_PAGE = 10_000  # the API's cap on ?limit=


class FarmError(RuntimeError):
    """A farm-level failure (no service of the class, every service down) with a one-line message."""


class ServiceLost(RuntimeError):
    """A service is reachable but its job failed or was cancelled: its share must go elsewhere."""


@dataclass
class Service:
    """One latency service as the farm file names it, plus what it reported about itself."""

    url: str
    token: str | None = None
    device_id: str | None = None
    device_class: str | None = None
    backend: str | None = None
    healthy: bool = False
    problem: str | None = None
    queue: int = 0

    def client(self) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        return httpx.Client(base_url=self.url.rstrip("/"), headers=headers, timeout=_TIMEOUT)


@dataclass
class Assignment:
    """A service's share of the grid and what has been seen of it."""

    service: Service
    keys: list[str] = field(default_factory=list)
    jobs: list[int] = field(default_factory=list)
    measured: set[str] = field(default_factory=set)
    failed: int = 0
    misses: int = 0
    down: bool = False
    reassigned: list[str] = field(default_factory=list)
    history_scanned: bool = False  # whether the variants sent last were looked up in the whole history


@dataclass
class FarmResult:
    """Which variant was measured where; the JSON form is what ``--report`` writes."""

    device_class: str
    total: int
    measured_by: dict[str, list[str]]
    failed_on: dict[str, int]
    down: list[str]
    unmeasured: list[str]

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def read_farm_file(path: Path, default_token: str | None) -> list[Service]:
    """``devices: [{url, token?}, ...]`` (or a bare list of URLs) in YAML or JSON, plus an optional farm ``token``."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"file: cannot read {path}: {exc.strerror or exc}") from exc
    if path.suffix == ".json":
        data = json.loads(text)
    else:
        try:
            import yaml
        except ImportError as exc:
            raise ValueError(
                "file: reading YAML needs PyYAML (pip install pyyaml); a .json farm file does not"
            ) from exc
        data = yaml.safe_load(text)
    token = data.get("token", default_token) if isinstance(data, dict) else default_token
    entries = data.get("devices") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"devices: {path} must list at least one device (a URL or {{url: ..., token: ...}})")
    services = []
    for index, entry in enumerate(entries):
        url = entry if isinstance(entry, str) else entry.get("url") if isinstance(entry, dict) else None
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"devices[{index}].url: must be an http(s) URL, got {url!r}")
        entry_token = entry.get("token", token) if isinstance(entry, dict) else token
        services.append(Service(url=url, token=os.path.expandvars(entry_token) if entry_token else None))
    return services


def probe(service: Service) -> Service:
    """Fill in health, identity and queue length (variants still waiting in queued or running jobs)."""
    try:
        with service.client() as client:
            client.get("/v1/health").raise_for_status()
            device = client.get("/v1/device")
            device.raise_for_status()
            info = device.json()
            jobs = client.get("/v1/jobs", params={"limit": 1000})
            jobs.raise_for_status()
    except httpx.HTTPStatusError as exc:
        code, path = exc.response.status_code, exc.request.url.path
        # /v1/health needs no token: a 401 after it means the service is up and the token is wrong or missing.
        service.healthy = code in (401, 403) and path != "/v1/health"
        service.problem = f"HTTP {code} on {path}" + (" (check --token / FIGS_TOKEN)" if service.healthy else "")
        return service
    except httpx.HTTPError as exc:
        service.healthy, service.problem = False, f"unreachable ({exc.__class__.__name__})"
        return service
    service.healthy, service.problem = True, None
    service.device_id, service.device_class = info.get("device_id"), info.get("device_class")
    service.backend = info.get("backend")
    pending = [j for j in jobs.json() if j.get("status") in ("queued", "running")]
    service.queue = sum(j["total"] - j["done"] - j["failed"] for j in pending)
    return service


def measured_keys(service: Service, wanted: set[str], *, full: bool = True) -> set[str]:
    """Keys of ``wanted`` visible in the service's /v1/measurements, which lists the newest first.

    ``full`` pages through the whole history (variants measured before this run, which a job without ``force``
    skips); otherwise only the newest ``len(wanted)`` + 100 entries are read, which is where a running job's
    results appear -- a poll must not download a device's entire history every half second.
    """
    found: set[str] = set()
    offset = 0
    limit = _MEASUREMENT_PAGE if full else min(_MEASUREMENT_PAGE, len(wanted) + 100)
    with service.client() as client:
        while True:
            page = client.get("/v1/measurements", params={"limit": limit, "offset": offset})
            page.raise_for_status()
            body = page.json()
            found |= {item["key"] for item in body["items"]} & wanted
            offset += len(body["items"])
            if not full or found == wanted or not body["items"] or offset >= body["total"]:
                return found


def _post_job(service: Service, ops: list[OpSpec], force: bool) -> int:
    with service.client() as client:
        response = client.post("/v1/jobs", json={"ops": [op.to_dict() for op in ops], "force": force})
        response.raise_for_status()
        return int(response.json()["id"])


def _deal(keys: list[str], assignments: list[Assignment]) -> dict[int, list[str]]:
    """Round-robin, so every service gets a mix of small and large variants from an ordered grid."""
    shares: dict[int, list[str]] = {i: [] for i in range(len(assignments))}
    for index, key in enumerate(keys):
        shares[index % len(assignments)].append(key)
    return shares


def _poll(assignment: Assignment) -> None:
    """One look at a service: its job counters and which of its variants its /v1/measurements shows.

    Measurements are read on every poll, not only when the counters move: they are what a reassignment trusts.
    """
    service = assignment.service
    with service.client() as client:
        jobs = [client.get(f"/v1/jobs/{job_id}") for job_id in assignment.jobs]
    for response in jobs:
        response.raise_for_status()
    states = [r.json() for r in jobs]
    missing = set(assignment.keys) - assignment.measured
    if missing:
        assignment.measured |= measured_keys(service, missing, full=not assignment.history_scanned)
    assignment.history_scanned = True
    assignment.failed = sum(s["failed"] for s in states)
    lost = [s for s in states if s["status"] in ("failed", "cancelled")]
    if lost:
        raise ServiceLost(f"job {lost[0]['id']} {lost[0]['status']}: {lost[0].get('error')}")


def _poll_outcome(assignment: Assignment) -> Exception | None:
    try:
        _poll(assignment)
    except (ServiceLost, httpx.HTTPError) as exc:
        return exc
    return None


def _finished(assignment: Assignment) -> bool:
    return assignment.down or len(assignment.measured) + assignment.failed >= len(assignment.keys)


def shard_and_wait(
    services: list[Service],
    ops: list[OpSpec],
    *,
    force: bool = False,
    poll_s: float = 0.5,
    down_after: int = 3,
    observer: Callable[[list[Assignment]], None] | None = None,
    show_progress: bool = True,
) -> FarmResult:
    """Shard ``ops`` across ``services`` (one device class), wait, reassign the shares of services that go down.

    ``observer`` is called after every polling round with the live assignments (progress displays, tests).
    """
    by_key = {op.key: op for op in ops}
    keys = list(by_key)
    assignments = [Assignment(service=s) for s in services]
    for index, share in _deal(keys, assignments).items():
        if share:
            assignments[index].keys = share
            assignments[index].jobs.append(_post_job(services[index], [by_key[k] for k in share], force))
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err_console, disable=not show_progress, transient=False) as progress:
        task = progress.add_task(f"profiling on {len(services)} services", total=len(keys))
        with ThreadPoolExecutor(max_workers=len(assignments), thread_name_prefix="farm-poll") as pool:
            while not all(_finished(a) for a in assignments):
                time.sleep(poll_s)
                # Concurrently: a service busy measuring can take over a second to answer one request.
                live = [a for a in assignments if not _finished(a)]
                outcomes = list(pool.map(_poll_outcome, live))
                for assignment, problem in zip(live, outcomes, strict=True):
                    if problem is None:
                        assignment.misses = 0
                    elif isinstance(problem, ServiceLost):
                        _reassign(assignment, assignments, by_key, force, reason=str(problem))
                    else:
                        assignment.misses += 1
                        if assignment.misses >= down_after:
                            reason = str(problem) or problem.__class__.__name__
                            _reassign(assignment, assignments, by_key, force, reason=reason)
                done = sum(len(a.measured) + a.failed for a in assignments)
                alive = sum(not a.down for a in assignments)
                progress.update(task, completed=done, description=f"profiling on {alive} services")
                if observer is not None:
                    observer(assignments)
    return FarmResult(
        device_class=services[0].device_class or "",
        total=len(keys),
        measured_by={a.service.url: sorted(a.measured) for a in assignments},
        failed_on={a.service.url: a.failed for a in assignments},
        down=[a.service.url for a in assignments if a.down],
        unmeasured=sorted(set(keys) - set().union(*(a.measured for a in assignments))),
    )


def _reassign(
    dead: Assignment, assignments: list[Assignment], by_key: dict[str, OpSpec], force: bool, *, reason: str
) -> None:
    dead.down = True
    dead.service.problem = reason
    leftover = [k for k in dead.keys if k not in dead.measured]
    dead.reassigned = leftover
    dead.keys = [k for k in dead.keys if k in dead.measured]
    err_console.print(f"[yellow]{dead.service.url} is down ({reason}); reassigning {len(leftover)} variants[/yellow]")
    survivors = [a for a in assignments if not a.down]
    if not survivors:
        raise FarmError(f"every service of the class is down; {len(leftover)} variants were not measured")
    if not leftover:
        return
    for index, share in _deal(leftover, survivors).items():
        if share:
            target = survivors[index]
            target.jobs.append(_post_job(target.service, [by_key[k] for k in share], force))
            target.keys.extend(share)
            target.history_scanned = False


__all__ = [
    "Assignment",
    "FarmError",
    "FarmResult",
    "Service",
    "ServiceLost",
    "measured_keys",
    "probe",
    "read_farm_file",
    "shard_and_wait",
]
