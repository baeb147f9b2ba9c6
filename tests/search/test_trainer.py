"""The search loop on digits: penalties move the expected latency to the target, checkpoints resume, gates converge.

The latency tables here are FLOPs-proportional (a fixed cost per layer plus one per MAC): a smooth, known cost,
so the assertions are about the loop, not about one machine's timings.  Real tables from a real service are used
in ``test_cli.py``'s end-to-end test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from search.data import DataBundle, load_dataset
from search.export import evaluate
from search.gates import GateConfig
from search.spaces.base import SearchSpace, create_space
from search.trainer import SearchConfig, finetune, keep_probabilities, retrain_from_scratch, run_search

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> None:
    # Two intra-op threads on a 2-core machine shared with other suites thrash: steps ran 10x slower here.
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def digits() -> DataBundle:
    return load_dataset("digits")


def make_space(data: DataBundle, **kwargs: object) -> SearchSpace:
    torch.manual_seed(0)
    return create_space(
        "blocks", in_channels=data.in_channels, num_classes=data.num_classes, image_size=data.image_size, **kwargs
    )


def flops_proportional_tables(space: SearchSpace) -> list[torch.Tensor]:
    """Per layer: 2 µs fixed plus 1 ns per MAC at every live-channel count (0 ms when nothing is live)."""
    tables = []
    for layer in space.latency_layers():
        rows, cols = layer.table_shape
        cins = torch.arange(rows, dtype=torch.float64) if layer.input_gated else torch.tensor([float(layer.cin)])
        couts = torch.arange(cols, dtype=torch.float64) if layer.output_gated else torch.tensor([float(layer.cout)])
        flops_a, flops_b, _, _ = layer.cost_coefficients()
        flops = flops_a * cins[:, None] * couts[None, :] + flops_b * couts[None, :]
        table = 0.002 + flops / 2 * 1e-6
        table[cins == 0, :] = 0
        table[:, couts == 0] = 0
        tables.append(table)
    return tables


def full_latency(tables: list[torch.Tensor]) -> float:
    return float(sum(t[-1, -1] for t in tables))


def test_latency_penalty_pulls_expected_latency_to_target(digits: DataBundle) -> None:
    space = make_space(digits)
    tables = flops_proportional_tables(space)
    target = 0.6 * full_latency(tables)
    # FLOPs-shaped tables span ~10x from narrowest to full; the default gate rate (0.2, chosen on measured tables
    # that span ~1.4x) overshoots them to 0.5x target before recovering, so this loop test uses 0.05.
    config = SearchConfig(
        steps=120, target_latency_ms={"cpu": target}, eval_every=40, log_every=10, strength=5.0, gate_lr=0.05
    )
    result = run_search(config, space, digits, {"cpu": tables}, progress=False)
    first, last = result.history[0], result.history[-1]
    assert first["latency_ms/cpu"] > target * 1.2
    assert last["latency_ms/cpu"] == pytest.approx(target, rel=0.12)
    assert result.final_costs["flops"] < first["flops"]
    assert last["train_accuracy"] > 0.5
    assert {"task_loss", "val_accuracy", "params", "penalty/latency_ms/cpu"} <= set(last)
    assert 0 < result.cost_seconds < result.wall_seconds
    compact, _ = space.compact()
    assert sum(p.numel() for p in compact.parameters()) < sum(p.numel() for p in space.weight_parameters())
    # The supernet's eval accuracy (hard masks, running BN statistics gathered under relaxed masks) lags; the
    # compact network recovers within a short fine-tune from the searched weights.
    finetune(compact, digits, 60)
    assert evaluate(compact, digits.val).accuracy > 0.8


def test_no_target_keeps_the_network_wide(digits: DataBundle) -> None:
    space = make_space(digits)
    tables = flops_proportional_tables(space)
    result = run_search(SearchConfig(steps=20, eval_every=20), space, digits, {"cpu": tables}, progress=False)
    assert result.final_costs["latency_ms/cpu"] > 0.8 * full_latency(tables)


def test_checkpoint_and_resume_continue_the_same_search(digits: DataBundle, tmp_path: Path) -> None:
    space = make_space(digits)
    tables = {"cpu": flops_proportional_tables(space)}
    config = SearchConfig(steps=40, target_latency_ms={"cpu": 0.05}, checkpoint_every=20, eval_every=20)

    class Interrupt(Exception):
        pass

    def stop_at_30(step: int, _: dict[str, float]) -> None:
        if step == 30:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_search(config, space, digits, tables, out_dir=tmp_path, progress=False, on_step=stop_at_30)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["step"] == 20
    resumed_space = make_space(digits)
    result = run_search(config, resumed_space, digits, tables, out_dir=tmp_path, resume=True, progress=False)
    assert result.steps_done == 40
    steps = [h["step"] for h in result.history]
    assert steps == sorted(steps) and steps[0] == 10 and steps[-1] == 40 and 30 in steps
    assert (
        torch.equal(
            state["space"]["blocks.0.project_gate.log_odds"],
            make_space(digits).state_dict()["blocks.0.project_gate.log_odds"],
        )
        is False
    )


def test_resume_refuses_changed_settings(digits: DataBundle, tmp_path: Path) -> None:
    space = make_space(digits)
    tables = {"cpu": flops_proportional_tables(space)}
    run_search(SearchConfig(steps=10, eval_every=10), space, digits, tables, out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="gate_lr"):
        run_search(
            SearchConfig(steps=20, gate_lr=0.5), space, digits, tables, out_dir=tmp_path, resume=True, progress=False
        )
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run_search(SearchConfig(steps=10), space, digits, tables, out_dir=tmp_path / "x", resume=True, progress=False)


def test_search_stops_when_gates_stop_moving(digits: DataBundle) -> None:
    space = make_space(digits)
    tables = {"cpu": flops_proportional_tables(space)}
    config = SearchConfig(steps=400, gate_lr=0.0, eval_every=10, converge_patience=2, converge_tol=1e-6)
    result = run_search(config, space, digits, tables, progress=False)
    assert result.converged and result.steps_done == 30


def test_reinforce_gates_learn_from_the_task_and_cost(digits: DataBundle) -> None:
    space = make_space(digits, gate=GateConfig(estimator="reinforce"))
    tables = {"cpu": flops_proportional_tables(space)}
    before = {k: torch.tensor(v) for k, v in keep_probabilities(space).items()}
    config = SearchConfig(steps=30, target_latency_ms={"cpu": 0.02}, eval_every=30)
    run_search(config, space, digits, tables, progress=False)
    after = {k: torch.tensor(v) for k, v in keep_probabilities(space).items()}
    assert any(not torch.allclose(before[k], after[k]) for k in before)


def test_lagrangian_multiplier_rises_while_over_target(digits: DataBundle) -> None:
    space = make_space(digits)
    tables = {"cpu": flops_proportional_tables(space)}
    config = SearchConfig(steps=30, penalty="lagrangian", target_latency_ms={"cpu": 0.01}, eval_every=10, log_every=10)
    result = run_search(config, space, digits, tables, progress=False)
    # The term is λ·(latency / target − 1); the latency falls as λ rises, so recover λ itself from each record.
    multipliers = [h["penalty/latency_ms/cpu"] / (h["latency_ms/cpu"] / 0.01 - 1) for h in result.history]
    assert multipliers[-1] > multipliers[0] > 0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"steps": 0}, "steps"),
        ({"optimizer": "lbfgs"}, "optimizer"),
        ({"penalty": "l2"}, "penalty"),
        ({"expectation": "mc"}, "expectation"),
        ({"target_latency_ms": {"cpu": -1.0}}, "target_latency_ms"),
        ({"target_flops": 0}, "target_flops"),
    ],
)
def test_config_errors_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SearchConfig(**kwargs)  # type: ignore[arg-type]


def test_tables_must_cover_every_target_device(digits: DataBundle) -> None:
    space = make_space(digits)
    with pytest.raises(ValueError, match="phone"):
        run_search(SearchConfig(steps=1, target_latency_ms={"phone": 1.0}), space, digits, {}, progress=False)


def test_finetune_and_retrain_from_scratch(digits: DataBundle) -> None:
    space = make_space(digits)
    compact, _ = space.eval().compact()
    before = evaluate(compact, digits.val).accuracy
    finetune(compact, digits, 40)
    tuned = evaluate(compact, digits.val).accuracy
    assert tuned > max(before, 0.5)
    fresh = retrain_from_scratch(compact, digits, 5)
    first_conv = next(p for n, p in compact.named_parameters() if n.endswith("weight"))
    fresh_conv = next(p for n, p in fresh.named_parameters() if n.endswith("weight"))
    assert not torch.equal(first_conv, fresh_conv)
