"""A real ``latency-service serve`` on a loopback port with a throwaway SQLite store, for the benchmarks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def local_service(settings: dict[str, str] | None = None, *, start_timeout_s: float = 60.0) -> Iterator[str]:
    """Yields the service's URL once ``/v1/health`` answers; ``settings`` are extra ``FIGS_*`` variables (the
    service keeps the host-wide measurement lock unless they move it).  The process is stopped on the way out, also
    when a SIGTERM unwinds through here."""
    with tempfile.TemporaryDirectory(prefix="figs-bench-") as data_dir:
        port = free_port()
        log_path = Path(data_dir) / "service.log"
        env = {**os.environ, "FIGS_DEVICE_ID": "bench-cpu", **(settings or {})}
        with open(log_path, "w") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "latency_service", "serve", "--port", str(port), "--data-dir", data_dir],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
            url = f"http://127.0.0.1:{port}"
            try:
                deadline = time.monotonic() + start_timeout_s
                while not _healthy(url):
                    if process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"latency service did not start: {log_path.read_text()}")
                    time.sleep(0.3)
                yield url
            finally:
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/v1/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
