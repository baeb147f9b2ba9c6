"""HTTP client for one device's latency service, with retries and an on-disk cache of latency tables.

A search asks each device once for the latency of every gated layer over a grid of active channel counts
(``POST /v1/tables``).  Those tables are cached on disk keyed by device id, predictor version and the layer specs, so
a search that is restarted while a device is offline still has its cost model: after the retries fail, the client
falls back to the newest cached tables for the same URL and layers.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from predictors.ops import OpSpec

# Gateway errors and "busy" mean the service (or a proxy in front of it) may answer on a later try; anything else
# in 4xx/5xx is a real answer and retrying would only repeat it.
RETRYABLE_STATUS = frozenset({429, 502, 503, 504})
DEFAULT_CACHE_DIR = Path(os.environ.get("FIGS_CACHE_DIR", Path.home() / ".cache" / "figs" / "tables"))


class ServiceError(RuntimeError):
    """The service answered, but with an error (bad request, unfitted predictor, ...)."""

    def __init__(self, url: str, status_code: int, detail: str) -> None:
        super().__init__(f"{url} answered HTTP {status_code}: {detail}")
        self.url = url
        self.status_code = status_code
        self.detail = detail


class ServiceUnavailableError(RuntimeError):
    """The service did not answer after all retries (and, for tables, nothing usable was cached)."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"latency service at {url} is unavailable: {reason}")
        self.url = url
        self.reason = reason


@dataclass(frozen=True)
class DeviceInfo:
    device_id: str
    device_class: str
    backend: str
    backend_version: str
    host: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TableLayer:
    """One gated layer at full widths and the active channel counts its latency table is wanted for."""

    op: OpSpec
    cin_counts: tuple[int, ...]
    cout_counts: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op.to_dict(), "cin_counts": list(self.cin_counts), "cout_counts": list(self.cout_counts)}


@dataclass(frozen=True)
class LatencyTables:
    """``tables[i][a, b]``: predicted ms of layer i with ``cin_counts[a]`` inputs and ``cout_counts[b]`` outputs."""

    device_id: str
    predictor_version: str
    layers: tuple[TableLayer, ...]
    tables: tuple[np.ndarray, ...]
    from_cache: bool = False


@dataclass(frozen=True)
class ModelMeasurement:
    median_ms: float
    p10_ms: float
    p90_ms: float
    n: int


@dataclass(frozen=True)
class ModelPrediction:
    total_ms: float
    kernels: list[dict[str, Any]]
    unmodelled: list[Any]


def count_grid(full: int, step: int) -> tuple[int, ...]:
    """Counts 1, step, 2·step, ..., full: the ends are always present so interpolation never extrapolates."""
    if full < 1:
        raise ValueError(f"channel count must be positive, got {full}")
    if step < 1:
        raise ValueError(f"count_step must be positive, got {step}")
    counts = {1, full, *range(step, full, step)}
    return tuple(sorted(counts))


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:32]


class TableCache:
    """Latency tables as JSON files: ``<key>.json`` per (device, predictor version, layers), plus a per-URL pointer.

    JSON, not pickle, so that a cache written by one numpy version is read by any other.
    """

    def __init__(self, directory: Path | str = DEFAULT_CACHE_DIR) -> None:
        self.directory = Path(directory)

    @staticmethod
    def _layers_payload(layers: Sequence[TableLayer]) -> list[dict[str, Any]]:
        return [layer.to_dict() for layer in layers]

    def entry_key(self, device_id: str, predictor_version: str, layers: Sequence[TableLayer]) -> str:
        return _digest({"device": device_id, "predictor": predictor_version, "layers": self._layers_payload(layers)})

    def pointer_key(self, url: str, layers: Sequence[TableLayer]) -> str:
        return _digest({"url": url.rstrip("/"), "layers": self._layers_payload(layers)})

    def save(self, url: str, tables: LatencyTables) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        key = self.entry_key(tables.device_id, tables.predictor_version, tables.layers)
        entry = {
            "device_id": tables.device_id,
            "predictor_version": tables.predictor_version,
            "layers": self._layers_payload(tables.layers),
            "tables": [t.tolist() for t in tables.tables],
            "saved_at": time.time(),
        }
        self._write_atomic(self.directory / f"{key}.json", entry)
        self._write_atomic(self.directory / f"url-{self.pointer_key(url, tables.layers)}.json", {"entry": key})

    def load_for_url(self, url: str, layers: Sequence[TableLayer]) -> LatencyTables | None:
        pointer = self.directory / f"url-{self.pointer_key(url, layers)}.json"
        if not pointer.is_file():
            return None
        key = json.loads(pointer.read_text())["entry"]
        entry_path = self.directory / f"{key}.json"
        if not entry_path.is_file():
            return None
        entry = json.loads(entry_path.read_text())
        return LatencyTables(
            device_id=entry["device_id"],
            predictor_version=entry["predictor_version"],
            layers=tuple(layers),
            tables=tuple(np.asarray(t, dtype=np.float64) for t in entry["tables"]),
            from_cache=True,
        )

    @staticmethod
    def _write_atomic(path: Path, payload: Any) -> None:
        # A search killed mid-write must not leave a truncated file that poisons the next restart.
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(payload))
        tmp.replace(path)


class DeviceService:
    """One device's latency service over HTTP.

    Args:
        url: base URL, e.g. ``http://127.0.0.1:8000``.
        token: bearer token, when the service is configured with one.
        timeout: seconds per request; whole-model measurement is given ``measure_timeout`` instead.
        retries: extra attempts after a connection error, timeout or gateway status.
        backoff: first wait in seconds; doubles after each failed attempt.
        cache_dir: where latency tables are cached.
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        measure_timeout: float = 600.0,
        retries: int = 3,
        backoff: float = 0.5,
        cache_dir: Path | str | None = None,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"device URL must start with http:// or https://, got {url!r}")
        if retries < 0:
            raise ValueError(f"retries: must be at least 0, got {retries}")
        self.url = url.rstrip("/")
        self.retries = retries
        self.backoff = backoff
        self.measure_timeout = measure_timeout
        self.cache = TableCache(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> DeviceService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- transport ---------------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, *, repeatable: bool = True, **kwargs: Any) -> Any:
        """One call with retries.  ``repeatable=False`` (creating a job, fitting) retries only when the request
        never reached the service: after a read timeout the work may be running, and a repeat would queue it twice."""
        last_reason = "no attempt made"
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                response = self._client.request(method, path, **kwargs)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                last_reason = f"{type(exc).__name__}: {exc}"
                continue
            except httpx.TransportError as exc:
                last_reason = f"{type(exc).__name__}: {exc}"
                if not repeatable:
                    break
                continue
            if response.status_code in RETRYABLE_STATUS:
                last_reason = f"HTTP {response.status_code}"
                continue
            if response.status_code >= 400:
                raise ServiceError(self.url + path, response.status_code, _error_detail(response))
            return response.json()
        raise ServiceUnavailableError(self.url, f"{last_reason} after {attempt + 1} attempts")

    # ---- endpoints ---------------------------------------------------------------------------------------------
    def health(self) -> bool:
        """True when ``/v1/health`` answers ok; never raises for a down service."""
        try:
            body = self._request("GET", "/v1/health")
        except (ServiceUnavailableError, ServiceError):
            return False
        return isinstance(body, dict) and body.get("status") == "ok"

    def device(self) -> DeviceInfo:
        body = self._request("GET", "/v1/device")
        return DeviceInfo(
            device_id=str(body["device_id"]),
            device_class=str(body.get("device_class", "")),
            backend=str(body.get("backend", "")),
            backend_version=str(body.get("backend_version", "")),
            host=dict(body.get("host") or {}),
        )

    def latency_tables(self, layers: Sequence[TableLayer]) -> LatencyTables:
        """Predicted latency tables for ``layers``; the cache stands in when the service is unreachable.

        Raises:
            ServiceUnavailableError: the service is down after retries and nothing is cached for this URL and layers.
            ServiceError: the service refused the request (e.g. no fitted predictor).
        """
        layers = tuple(layers)
        try:
            body = self._request("POST", "/v1/tables", json={"layers": [layer.to_dict() for layer in layers]})
        except ServiceUnavailableError as exc:
            cached = self.cache.load_for_url(self.url, layers)
            if cached is None:
                raise ServiceUnavailableError(self.url, f"{exc.reason}; no cached tables for these layers") from exc
            return cached
        raw_tables = body.get("tables")
        if not isinstance(raw_tables, list) or len(raw_tables) != len(layers):
            raise ServiceError(self.url + "/v1/tables", 200, f"expected {len(layers)} tables in the answer")
        tables = []
        for index, (layer, raw) in enumerate(zip(layers, raw_tables, strict=True)):
            table = np.asarray(raw["latency_ms"], dtype=np.float64)
            expected = (len(layer.cin_counts), len(layer.cout_counts))
            if table.shape != expected:
                raise ServiceError(
                    self.url + "/v1/tables", 200, f"table {index} has shape {table.shape}, not {expected}"
                )
            tables.append(table)
        result = LatencyTables(
            device_id=str(body.get("device_id", "")),
            predictor_version=str(body.get("predictor_version", "")),
            layers=layers,
            tables=tuple(tables),
        )
        self.cache.save(self.url, result)
        return result

    def predict_model(self, onnx_bytes: bytes) -> ModelPrediction:
        body = self._request(
            "POST", "/v1/predict/model", content=onnx_bytes, headers={"Content-Type": "application/octet-stream"}
        )
        return ModelPrediction(
            total_ms=float(body["total_ms"]), kernels=list(body.get("kernels", [])), unmodelled=list(body["unmodelled"])
        )

    def measure_model(self, onnx_bytes: bytes) -> ModelMeasurement:
        body = self._request(
            "POST",
            "/v1/measure/model",
            content=onnx_bytes,
            headers={"Content-Type": "application/octet-stream"},
            timeout=self.measure_timeout,
        )
        return ModelMeasurement(
            median_ms=float(body["median_ms"]),
            p10_ms=float(body["p10_ms"]),
            p90_ms=float(body["p90_ms"]),
            n=int(body["n"]),
        )

    # ---- profiling helpers (used by tests, the benchmark and the README demo) ----------------------------------
    def submit_job(self, *, ops: Iterable[OpSpec] | None = None, preset: str | None = None) -> str:
        payload: dict[str, Any] = {"preset": preset} if preset else {"ops": [op.to_dict() for op in ops or ()]}
        return str(self._request("POST", "/v1/jobs", json=payload, repeatable=False)["id"])

    def wait_job(self, job_id: str, *, timeout: float = 600.0, poll: float = 0.5) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            job: dict[str, Any] = self._request("GET", f"/v1/jobs/{job_id}")
            if job.get("status") in {"done", "failed", "cancelled"}:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} at {self.url} not finished after {timeout:.0f} s: {job}")
            time.sleep(poll)

    def fit(self, *, timeout: float = 900.0) -> dict[str, Any]:
        result: dict[str, Any] = self._request("POST", "/v1/predictors/fit", repeatable=False, timeout=timeout)
        return result


def table_layers(latency_layers: Sequence[Any], count_step: int) -> list[TableLayer]:
    """The tables to ask for, one per ``search.spaces.base.LatencyLayer`` of a space, on its ``count_grid``.

    A depthwise layer has one count axis (its output); the service resizes depthwise convs by ``cout`` alone and
    wants the same list on both axes, so its rows all carry the same values.
    """
    requests = []
    for layer in latency_layers:
        cin_counts, cout_counts = layer.count_grid(count_step)
        if layer.depthwise:
            cin_counts = cout_counts
        requests.append(TableLayer(layer.op, tuple(cin_counts), tuple(cout_counts)))
    return requests


def dense_tables(latency_layers: Sequence[Any], tables: LatencyTables) -> list[Any]:
    """Per layer, the torch table over every live-channel count (``LatencyLayer.table_shape``) for the CostModel."""
    if len(latency_layers) != len(tables.tables):
        raise ValueError(f"tables: {len(tables.tables)} tables for {len(latency_layers)} latency layers")
    dense = []
    for layer, request, table in zip(latency_layers, tables.layers, tables.tables, strict=True):
        if layer.depthwise:
            dense.append(layer.dense_table([layer.cin], list(request.cout_counts), table[:1]))
        else:
            dense.append(layer.dense_table(list(request.cin_counts), list(request.cout_counts), table))
    return dense


def _error_detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    detail = body.get("detail", body) if isinstance(body, dict) else body
    return json.dumps(detail)[:300] if not isinstance(detail, str) else detail[:300]


__all__ = [
    "DeviceInfo",
    "DeviceService",
    "LatencyTables",
    "ModelMeasurement",
    "ModelPrediction",
    "ServiceError",
    "ServiceUnavailableError",
    "TableCache",
    "TableLayer",
    "count_grid",
    "dense_tables",
    "table_layers",
]
