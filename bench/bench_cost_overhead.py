"""The cost terms' share of a training step of the default search space, repeated to show its spread.

``bench_search.py`` measures it once per data set (inside a 70-minute run); this repeats the same measurement
(``step_overhead``: training steps with and without the exact expected latency, FLOPs and parameter terms,
interleaved, median of each; and the cost terms' own time inside the steps that have them) ``--repeats`` times
per data set.  The cost of the terms does not depend on the table
values, only on their shapes, so the tables here are the space's own latency layers filled with random positive
milliseconds: no service needed.

    python bench/bench_cost_overhead.py [--repeats 5] [--steps 100] [--datasets digits,mnist5k]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from search.costs import CostModel
from search.data import DataBundle, load_dataset
from search.spaces.base import create_space


def step_overhead(bundle: DataBundle, tables: list[torch.Tensor], steps: int) -> dict[str, float]:
    """Median step time with and without the cost terms (forward and backward) on the same supernet.

    Two measures: the difference of the two step times (steps interleaved, so machine noise hits both alike), and
    the cost terms' own time inside the with-cost steps — their evaluation plus a backward of their own, run before
    the task loss's backward (the gradients add up the same), so no difference of two noisy numbers is needed.
    """
    space = create_space(
        "blocks", in_channels=bundle.in_channels, num_classes=bundle.num_classes, image_size=bundle.image_size
    )
    cost_model = CostModel.from_space(space, {"cpu": tables}, mode="exact")
    optimiser = torch.optim.Adam(space.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(bundle.train, batch_size=64, shuffle=True, drop_last=True)
    batches = [b for b, _ in zip(loader, range(steps), strict=False)]
    timings: dict[str, list[float]] = {"with_costs": [], "without_costs": [], "cost_terms": []}
    for index in range(2 * len(batches)):
        inputs, labels = batches[index // 2]
        with_costs = index % 2 == 0  # interleaved, so machine noise hits both alike
        started = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(space(inputs), labels)
        optimiser.zero_grad()
        if with_costs:
            cost_started = time.perf_counter()
            values = cost_model.evaluate()
            (values.latency_ms["cpu"] + values.flops * 1e-9 + values.params * 1e-6).backward()
            timings["cost_terms"].append(time.perf_counter() - cost_started)
        loss.backward()
        optimiser.step()
        timings["with_costs" if with_costs else "without_costs"].append(time.perf_counter() - started)
    with_ms = statistics.median(timings["with_costs"][3:]) * 1e3
    without_ms = statistics.median(timings["without_costs"][3:]) * 1e3
    cost_ms = statistics.median(timings["cost_terms"][3:]) * 1e3
    return {
        "step_ms_with_costs": with_ms,
        "step_ms_without_costs": without_ms,
        "overhead": with_ms / without_ms - 1,
        "cost_ms": cost_ms,
        "cost_share": cost_ms / with_ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=100, help="steps of each kind per repeat")
    parser.add_argument("--datasets", default="digits,mnist5k")
    args = parser.parse_args()
    if args.repeats < 1 or args.steps < 5:
        parser.error("--repeats must be at least 1 and --steps at least 5")
    torch.set_num_threads(1)  # as in bench_search.py: the search trains on one core
    now, load = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), os.getloadavg()[0]
    print(f"date {now}; load average {load:.1f}; torch {torch.__version__}")
    print(
        "| data | step ms without costs (median of repeats) | with costs | overhead per repeat | median overhead "
        "| cost terms' own ms in the step (median) | their share of the step |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in args.datasets.split(","):
        bundle = load_dataset(name)
        space = create_space(
            "blocks", in_channels=bundle.in_channels, num_classes=bundle.num_classes, image_size=bundle.image_size
        )
        generator = torch.Generator().manual_seed(0)
        tables = [
            torch.rand(layer.table_shape, generator=generator, dtype=torch.float64) * 0.05
            for layer in space.latency_layers()
        ]
        runs = [step_overhead(bundle, tables, args.steps) for _ in range(args.repeats)]
        overheads = [r["overhead"] for r in runs]
        print(
            f"| {name} | {statistics.median(r['step_ms_without_costs'] for r in runs):.1f} | "
            f"{statistics.median(r['step_ms_with_costs'] for r in runs):.1f} | "
            f"{', '.join(f'{o:+.1%}' for o in overheads)} | {statistics.median(overheads):+.1%} | "
            f"{statistics.median(r['cost_ms'] for r in runs):.2f} | "
            f"{statistics.median(r['cost_share'] for r in runs):.1%} |"
        )


if __name__ == "__main__":
    main()
