"""The lock every timed region runs under: two timings that overlap on one CPU corrupt both."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from latency_service.config import DEFAULT_MEASURE_LOCK_PATH

try:
    import fcntl
except ImportError:  # Windows: the process-wide lock alone
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)


class MeasurementLock:
    """Held around every timed region: a process-wide lock plus, where the OS has ``flock``, a host-wide lock file,
    so that a local ``latency-service profile`` and a service on the same machine take turns as well."""

    def __init__(self) -> None:
        self._thread_lock = threading.Lock()
        self._fd: int | None = None
        self.path: Path | None = Path(DEFAULT_MEASURE_LOCK_PATH)

    def configure(self, path: str | None) -> None:
        self.path = Path(path) if path else None

    def __enter__(self) -> MeasurementLock:
        self._thread_lock.acquire()
        if self.path is not None and fcntl is not None:
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_CREAT, 0o666)  # flock needs no write access
            except OSError as exc:  # another user's lock file, a read-only /tmp: fall back to this process only
                logger.warning("measurement lock file %s unusable (%s); locking this process only", self.path, exc)
            else:
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._fd = fd
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            if self._fd is not None and fcntl is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
        finally:
            self._fd = None
            self._thread_lock.release()


MEASUREMENT_LOCK = MeasurementLock()
