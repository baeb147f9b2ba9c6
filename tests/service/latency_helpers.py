"""Helpers for the latency-service tests: fast measurement settings, tiny real variants, and real service processes
(``latency-service serve`` on a free loopback port)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

# Short but real measurements: a tiny conv takes ~10 µs, so 5 runs over >= 10 ms still time hundreds of calls.
FAST_MEASUREMENT_ENV = {
    "FIGS_WARMUP_RUNS": "2",
    "FIGS_WARMUP_S": "0",
    "FIGS_MIN_RUNS": "5",
    "FIGS_MIN_TIME_S": "0.01",
    "FIGS_MAX_TIME_S": "0.05",
    "FIGS_MAX_ATTEMPTS": "1",
    "FIGS_POLL_INTERVAL_S": "0.1",
}


def tiny_ops(count: int = 4) -> list[dict[str, Any]]:
    """Distinct small real variants (a few microseconds each on onnxruntime)."""
    ops: list[dict[str, Any]] = []
    for i in range(count):
        if i % 2:
            ops.append({"op": "relu", "c": 4 + i, "hw": 8})
        else:
            ops.append({"op": "conv2d", "cin": 4, "cout": 4 + i, "hw": 8, "k": 3})
    return ops


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServiceProcess:
    """A real ``latency-service serve`` subprocess."""

    env: dict[str, str]
    port: int = field(default_factory=free_port)
    token: str | None = None
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, token: str | None = None) -> httpx.Client:
        token = token if token is not None else self.token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def start(self, timeout: float = 60.0) -> ServiceProcess:
        args = [sys.executable, "-m", "latency_service", "serve", "--port", str(self.port), "--log-level", "warning"]
        if self.token:
            args += ["--token", self.token]
        assert self.log_path is not None
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(args, env={**os.environ, **self.env}, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"service exited with {self.process.returncode}:\n{self.log_path.read_text()}")
            try:
                if httpx.get(f"{self.url}/v1/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"service did not come up in {timeout} s:\n{self.log_path.read_text()}")

    def kill(self) -> None:
        """SIGKILL: no shutdown hook runs, exactly like a crash or a power cut."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


def wait_for_job(client: httpx.Client, job_id: int, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] not in ("queued", "running"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s: {job}")
