"""The device-service client: retries with backoff, typed errors, the on-disk table cache.

Transport behaviour is checked against real sockets (a closed port, a local HTTP server that answers 503); the
cache fallback against a real latency service process lives in ``test_cli.py``'s end-to-end module.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from predictors.ops import Conv2d, Linear
from search.service_client import (
    DeviceService,
    LatencyTables,
    ServiceError,
    ServiceUnavailableError,
    TableCache,
    TableLayer,
    count_grid,
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _ScriptedHandler(BaseHTTPRequestHandler):
    """Answers each request with the next (status, body) of the server's script; the last entry repeats."""

    def _answer(self) -> None:
        server = self.server
        assert isinstance(server, _ScriptedServer)
        server.requests.append((self.command, self.path, self.headers.get("Authorization")))
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        status, body = server.script[min(len(server.requests) - 1, len(server.script) - 1)]
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


class _ScriptedServer(ThreadingHTTPServer):
    def __init__(self, script: list[tuple[int, object]]) -> None:
        super().__init__(("127.0.0.1", 0), _ScriptedHandler)
        self.script = script
        self.requests: list[tuple[str, str, str | None]] = []


@pytest.fixture
def scripted() -> Iterator[_ScriptedServer]:
    server = _ScriptedServer([(200, {"status": "ok"})])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _url(server: _ScriptedServer) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


LAYERS = (
    TableLayer(Conv2d(cin=8, cout=16, hw=8, k=1, bn=True, act="relu"), count_grid(8, 4), count_grid(16, 4)),
    TableLayer(Linear(cin=16, cout=10), count_grid(16, 4), (10,)),
)


def test_count_grid_keeps_both_ends() -> None:
    assert count_grid(16, 4) == (1, 4, 8, 12, 16)
    assert count_grid(10, 4) == (1, 4, 8, 10)
    assert count_grid(1, 4) == (1,)
    with pytest.raises(ValueError, match="count_step"):
        count_grid(8, 0)


def test_closed_port_raises_naming_the_url_after_backoff(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    client = DeviceService(url, retries=2, backoff=0.05, cache_dir=tmp_path)
    started = time.monotonic()
    with pytest.raises(ServiceUnavailableError, match=url.replace(".", r"\.")) as info:
        client.device()
    assert time.monotonic() - started >= 0.05 + 0.1  # two waits: backoff, then twice the backoff
    assert "3 attempts" in info.value.reason
    assert client.health() is False


def test_tables_without_service_or_cache_name_the_url(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ServiceUnavailableError, match="no cached tables"):
        DeviceService(url, retries=0, cache_dir=tmp_path).latency_tables(LAYERS)


def test_retries_gateway_errors_then_succeeds(scripted: _ScriptedServer, tmp_path: Path) -> None:
    scripted.script = [(503, {"detail": "busy"}), (503, {"detail": "busy"}), (200, {"status": "ok"})]
    client = DeviceService(_url(scripted), token="s3cret", retries=3, backoff=0.01, cache_dir=tmp_path)
    assert client.health() is True
    assert len(scripted.requests) == 3
    assert all(auth == "Bearer s3cret" for _, _, auth in scripted.requests)


def test_client_errors_are_not_retried(scripted: _ScriptedServer, tmp_path: Path) -> None:
    scripted.script = [(422, {"detail": [{"loc": ["body", "layers", 0, "cin_counts"], "msg": "too large"}]})]
    client = DeviceService(_url(scripted), retries=3, backoff=0.01, cache_dir=tmp_path)
    with pytest.raises(ServiceError, match="cin_counts") as info:
        client.latency_tables(LAYERS)
    assert info.value.status_code == 422
    assert len(scripted.requests) == 1


def test_malformed_table_shape_is_refused(scripted: _ScriptedServer, tmp_path: Path) -> None:
    scripted.script = [(200, {"tables": [{"latency_ms": [[1.0]]}, {"latency_ms": [[1.0]]}], "device_id": "d"})]
    client = DeviceService(_url(scripted), retries=0, cache_dir=tmp_path)
    with pytest.raises(ServiceError, match="shape"):
        client.latency_tables(LAYERS)
    assert not list(tmp_path.glob("*.json")), "nothing may be cached from a refused answer"


def test_cache_is_keyed_by_url_and_layers(tmp_path: Path) -> None:
    cache = TableCache(tmp_path)
    shapes = [(len(layer.cin_counts), len(layer.cout_counts)) for layer in LAYERS]
    tables = tuple(np.arange(rows * cols, dtype=float).reshape(rows, cols) for rows, cols in shapes)
    cache.save("http://a:1/", LatencyTables("dev-a", "v1", LAYERS, tables))
    loaded = cache.load_for_url("http://a:1", LAYERS)
    assert loaded is not None and loaded.from_cache and loaded.device_id == "dev-a"
    assert all(np.array_equal(x, y) for x, y in zip(loaded.tables, tables, strict=True))
    assert cache.load_for_url("http://b:1", LAYERS) is None
    assert cache.load_for_url("http://a:1", LAYERS[:1]) is None
    assert cache.entry_key("dev-a", "v1", LAYERS) != cache.entry_key("dev-a", "v2", LAYERS)


def test_bad_url_is_refused() -> None:
    with pytest.raises(ValueError, match="http"):
        DeviceService("localhost:8400")
