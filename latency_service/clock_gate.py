"""A reference kernel timed between chunks of a measurement, so that samples taken while the machine ran slow are
set aside instead of averaged in.

Why: on the shared 2-vCPU VM this project is developed on, the same conv measured in back-to-back processes sat
at 0.115 ms or at 0.205 ms (1.75x) with a per-session CV under 1 % in both states; the state switched every
0.01-0.8 s, independently of anything this VM ran (a busy loop or a BLAS matmul pinned to the other vCPU changed
nothing), the signature of the host moving the core's clock or a neighbour sharing it.  No statistic over one
window can tell a kernel that *is* 0.2 ms from one measured in a slow state; a fixed reference kernel timed right
before and after each chunk can.  The gate keeps a chunk when the reference ran within ``tolerance`` of its
nominal (fastest) time, which makes medians repeat across service runs; on a device with a steady clock every
chunk passes and the gate costs ~15 % more time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from latency_service.backends.base import Backend, Runnable

# Runs of the reference per check: ~0.3-0.5 ms for a 30-45 µs conv, short enough to sit between chunks.
REFERENCE_RUNS = 9
# Untimed reference runs before each check: the variant has just evicted the reference's data, and a reference
# that pays for the refill reads slow although the clock is not.
REFILL_RUNS = 2
# Timed runs of the variant between two checks, in seconds; the first run after a check is discarded (the
# reference has just used the caches).
CHUNK_S = 0.012
# How long a gate watches the reference when it is built, to find the machine's fast state.
CALIBRATION_S = 0.4
# A fast state seen this recently is worth waiting for (the host's slow episodes last 0.01-1 s while it still visits
# the fast state); once it has not been seen for longer, the host is in a slow period of minutes and the gate only
# waits ``patience_s``.
FAST_MEMORY_S = 10.0


@dataclass
class GatedSamples:
    samples_s: np.ndarray
    # The reference's median over the kept chunks divided by its nominal time (1.0 when nothing was kept).
    reference_ratio: float


def select_chunks(chunks: Sequence[tuple[float, list[float]]], *, tolerance: float, min_runs: int) -> GatedSamples:
    """The samples of the chunks whose reference ratio is within ``tolerance``; when they are fewer than
    ``min_runs``, the chunks of the least slow states make up the difference."""
    kept = [sample for ratio, chunk in chunks if ratio <= 1 + tolerance for sample in chunk]
    kept_ratios = [ratio for ratio, _ in chunks if ratio <= 1 + tolerance]
    for ratio, chunk in sorted(chunks, key=lambda item: item[0]):
        if ratio > 1 + tolerance and len(kept) < min_runs:
            kept.extend(chunk)
            kept_ratios.append(ratio)
    return GatedSamples(
        samples_s=np.asarray(kept, dtype=np.float64),
        reference_ratio=float(np.median(kept_ratios)) if kept_ratios else 1.0,
    )


class ClockGate:
    """The reference runnable and its nominal time; :meth:`collect` times a variant through it."""

    def __init__(
        self,
        reference: Runnable,
        *,
        tolerance: float = 0.04,
        calibration_s: float = CALIBRATION_S,
        fast_memory_s: float = FAST_MEMORY_S,
    ) -> None:
        if not 0 < tolerance < 1:
            raise ValueError(f"tolerance: must be between 0 and 1, got {tolerance!r}")
        self.reference = reference
        self.tolerance = tolerance
        for _ in range(3 * REFERENCE_RUNS):
            reference.time_once()
        self.fast_memory_s = fast_memory_s
        self.nominal_s = np.inf
        self.last_fast_at = -np.inf
        deadline = time.perf_counter() + calibration_s
        while time.perf_counter() < deadline:
            self.check()

    @classmethod
    def for_backend(cls, backend: Backend, *, tolerance: float = 0.04) -> ClockGate:
        """A gate whose reference is a 3x3 conv 32->32 at 16 px (~45 µs on one x86 core): compute-bound, so a
        clock change shows in full, and small enough (~70 KB) to leave the variant's data in cache."""
        from predictors.ops import Conv2d

        return cls(backend.prepare_op(Conv2d(cin=32, cout=32, hw=16, k=3)), tolerance=tolerance)

    def check(self) -> float:
        """Time the reference once (median of a few runs); returns its ratio to the nominal time, updating it."""
        for _ in range(REFILL_RUNS):
            self.reference.time_once()
        median = float(np.median([self.reference.time_once() for _ in range(REFERENCE_RUNS)]))
        self.nominal_s = min(self.nominal_s, median)
        ratio = median / self.nominal_s
        if ratio <= 1 + self.tolerance:
            self.last_fast_at = time.perf_counter()
        return ratio

    def collect(
        self,
        time_once: Callable[[], float],
        *,
        min_runs: int,
        min_time_s: float,
        max_time_s: float,
        max_runs: int,
        min_samples: int = 1,
        patience_s: float | None = None,
    ) -> GatedSamples:
        """Chunks of ``time_once`` between reference checks until the kept samples reach both ``min_runs`` and
        ``min_time_s``, or ``max_time_s`` of wall time (or ``max_runs`` runs) is spent.

        ``patience_s`` ends the wait for the fast state earlier while the host has not visited it for
        ``fast_memory_s``: once that much wall time has passed and the chunks of every state together reach
        ``min_runs`` and ``min_time_s``.  The time cap still leaves at least
        ``min_samples`` samples.  When fewer than ``min_runs`` were kept by then, the chunks from the least slow
        states make up the difference, and ``reference_ratio`` says how slow.
        """
        kept: list[float] = []
        chunks: list[tuple[float, list[float]]] = []
        started = time.perf_counter()
        runs = collected = 0
        kept_s = collected_s = 0.0
        before = self.check()
        while True:
            time_once()  # the reference has just run: this one pays for refilling the caches
            chunk: list[float] = []
            chunk_start = time.perf_counter()
            while time.perf_counter() - chunk_start < CHUNK_S or not chunk:
                chunk.append(time_once())
            runs += len(chunk) + 1
            collected += len(chunk)
            collected_s += sum(chunk)
            after = self.check()
            ratio = max(before, after)
            chunks.append((ratio, chunk))
            if ratio <= 1 + self.tolerance:
                kept.extend(chunk)
                kept_s += sum(chunk)
            before = after
            elapsed = time.perf_counter() - started
            if len(kept) >= min_runs and kept_s >= min_time_s:
                break
            if (elapsed >= max_time_s and collected >= min_samples) or runs >= max_runs:
                break
            if (
                patience_s is not None
                and elapsed >= patience_s
                and collected >= min_runs
                and collected_s >= min_time_s
                and time.perf_counter() - self.last_fast_at > self.fast_memory_s
            ):
                break
        return select_chunks(chunks, tolerance=self.tolerance, min_runs=min_runs)

    def close(self) -> None:
        self.reference.close()


__all__ = ["CHUNK_S", "ClockGate", "GatedSamples", "select_chunks"]
