"""`figs`: search, export and evaluate from the command line.

Bad input (unknown data set, a target count that matches neither one nor every device, a malformed URL, a missing
checkpoint) exits with code 2 and one line on stderr; an unreachable device with nothing cached exits with code 3.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Annotated, Any, NoReturn

import torch
import typer
from rich.console import Console
from rich.table import Table

from search.data import DataBundle, DatasetError, load_dataset
from search.export import (
    DeviceLink,
    LatencyCalibration,
    calibrate_devices,
    connect_devices,
    device_tables,
    evaluate,
    export_onnx,
    load_checkpoint_space,
    read_architecture,
    write_architecture,
)
from search.farm import farm_app
from search.gates import GateConfig
from search.plots import plot_keep_probabilities, plot_trajectory
from search.refine import (
    RefineRound,
    WidthKnob,
    WidthSelection,
    compact_searched,
    measure_on_devices,
    refine_to_measured,
    select_width,
    verify_on_devices,
)
from search.service_client import ServiceError, ServiceUnavailableError
from search.spaces.base import create_space, from_architecture, list_spaces
from search.trainer import CHECKPOINT_NAME, SearchConfig, finetune, retrain_from_scratch, run_search

app = typer.Typer(help="FiGS: hardware-aware fine-grained stochastic architecture search.", no_args_is_help=True)
app.add_typer(farm_app, name="farm")
console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 2) -> NoReturn:
    err_console.print(f"error: {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the library's typed input errors into exit code 2 and an unreachable service into exit code 3."""
    try:
        yield
    except (DatasetError, ValueError, FileNotFoundError, KeyError) as exc:
        fail(str(exc).strip("'\""))
    except ServiceUnavailableError as exc:
        fail(str(exc), code=3)
    except ServiceError as exc:
        fail(str(exc), code=3)


def _targets_per_device(devices: list[str], targets: list[float]) -> list[float]:
    if not targets:
        fail("--target-latency-ms: give one target for all devices, or one per --device")
    if len(targets) == 1:
        return targets * len(devices)
    if len(targets) != len(devices):
        fail(f"--target-latency-ms: {len(targets)} targets for {len(devices)} devices; give 1 or {len(devices)}")
    return targets


@app.command()
def search(
    device: Annotated[list[str], typer.Option("--device", help="latency service URL; repeat for several devices")],
    target_latency_ms: Annotated[list[float], typer.Option(help="one for all devices, or one per --device")],
    out: Annotated[Path, typer.Option(help="output directory")],
    data: Annotated[str, typer.Option(help="digits, mnist5k, or a CIFAR-10 / ImageFolder directory")] = "digits",
    steps: Annotated[int, typer.Option(min=1)] = 400,
    target_flops: Annotated[float | None, typer.Option()] = None,
    target_params: Annotated[float | None, typer.Option()] = None,
    space: Annotated[str, typer.Option(help="search space")] = "blocks",
    resume: Annotated[bool, typer.Option(help="continue from OUT/checkpoint.pt")] = False,
    expectation: Annotated[str, typer.Option(help="exact or plugin")] = "exact",
    penalty: Annotated[str, typer.Option(help="hinge or lagrangian")] = "hinge",
    strength: Annotated[float, typer.Option(help="penalty strength (hinge)")] = 2.0,
    optimizer: Annotated[str, typer.Option(help="sgd, adam or rmsprop (weights)")] = "adam",
    lr: Annotated[float, typer.Option()] = 3e-3,
    gate_lr: Annotated[float, typer.Option()] = 0.2,
    batch_size: Annotated[int, typer.Option(min=1)] = 64,
    finetune_steps: Annotated[int, typer.Option(min=0)] = 200,
    retrain: Annotated[
        bool, typer.Option(help="retrain the compact network from scratch instead of fine-tuning")
    ] = False,
    count_step: Annotated[int, typer.Option(min=1, help="channel-count grid step of the latency tables")] = 4,
    calibrate: Annotated[
        bool, typer.Option(help="map table ms to measured ms with uniform-width models measured on each device")
    ] = True,
    threshold: Annotated[float, typer.Option(help="keep channels whose probability is at least this")] = 0.5,
    token: Annotated[str | None, typer.Option(envvar="FIGS_TOKEN", help="bearer token for the services")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    measure: Annotated[bool, typer.Option(help="ask each device to measure and predict the exported model")] = True,
    threads: Annotated[int, typer.Option(min=1, help="torch intra-op threads for training")] = 1,
    estimator: Annotated[str, typer.Option(help="gate estimator: concrete, hard_concrete or reinforce")] = "concrete",
    temperature: Annotated[float, typer.Option(help="relaxation temperature of the gates")] = 0.5,
    temperature_decay: Annotated[float, typer.Option(help="anneal: τ · decay^(step / decay-steps)")] = 1.0,
    decay_steps: Annotated[int, typer.Option(min=1)] = 1000,
    straight_through: Annotated[bool, typer.Option(help="hard 0/1 masks forward, relaxed gradient backward")] = False,
    max_measurements: Annotated[
        int, typer.Option(min=0, help="device measurements to choose the final width by (0: take the searched one)")
    ] = 8,
    refine_rounds: Annotated[
        int, typer.Option(min=0, help="before that, correct the table targets and search on this many times")
    ] = 0,
    refine_steps: Annotated[int, typer.Option(min=1, help="search steps after each correction")] = 100,
    tolerance: Annotated[float, typer.Option(help="stop when every device is this close to target (relative)")] = 0.05,
    channel_multiple: Annotated[
        int,
        typer.Option(min=1, help="round kept widths to this multiple (1: off); unaligned widths ran 4x slower here"),
    ] = 8,
) -> None:
    """Search a network that meets the latency targets, compact and fine-tune it, export it, check it on the devices."""
    targets = _targets_per_device(device, target_latency_ms)
    # One thread by default: a local latency service measures on the other core, and two training threads on a
    # loaded 2-core machine ran each step ~10x slower than one.
    torch.set_num_threads(threads)
    with user_errors():
        # Every option is checked before any device is contacted: a typo must not cost a calibration run.
        config = SearchConfig(
            steps=steps,
            batch_size=batch_size,
            optimizer=optimizer,  # type: ignore[arg-type]  # validated in SearchConfig
            lr=lr,
            gate_lr=gate_lr,
            target_latency_ms={url: t for url, t in zip(device, targets, strict=True)},
            target_flops=target_flops,
            target_params=target_params,
            penalty=penalty,  # type: ignore[arg-type]
            strength=strength,
            expectation=expectation,  # type: ignore[arg-type]
            seed=seed,
        )
        for name, value in (("--threshold", threshold), ("--tolerance", tolerance)):
            if not 0 < value < 1:
                raise ValueError(f"{name}: must be in (0, 1), got {value}")
        if space not in list_spaces():
            raise ValueError(f"--space: unknown space {space!r}; known: {', '.join(list_spaces())}")
        gate = GateConfig(
            estimator=estimator,  # type: ignore[arg-type]  # validated in GateConfig
            temperature=temperature,
            decay=temperature_decay,
            decay_steps=decay_steps,
            straight_through=straight_through,
        )
        if resume and not (out / CHECKPOINT_NAME).is_file():
            raise FileNotFoundError(f"--resume: no checkpoint in {out}")
        links = connect_devices(device, token=token)
        bundle = load_dataset(data, seed=seed)
        supernet = create_space(space, **_shape(bundle), gate=gate)
        tables = device_tables(links, supernet, count_step=count_step, console=err_console)
        calibrations = _calibrations(
            links, space, bundle, out, resume=resume, enabled=calibrate, multiple=channel_multiple
        )
        table_targets = {}
        for link, target in zip(links, targets, strict=True):
            table_target = calibrations[link.name].to_table(target) if calibrate else target
            if not table_target > 0:
                raise ValueError(f"--target-latency-ms: {target} ms on {link.name} is below what this space reaches")
            table_targets[link.name] = table_target
        config = replace(config, target_latency_ms=table_targets)
        out.mkdir(parents=True, exist_ok=True)
        meta = {
            "space": space,
            "data": data,
            "seed": seed,
            "threshold": threshold,
            "channel_multiple": channel_multiple,
            "gate": asdict(gate),
            **_shape(bundle),
        }
        result = run_search(config, supernet, bundle, tables, out_dir=out, resume=resume, checkpoint_meta=meta)
        refinement: list[RefineRound] = []
        measured_targets = {link.name: t for link, t in zip(links, targets, strict=True)}
        if measure and refine_rounds:
            scales = {name: calibrations[name].scale if calibrate else 1.0 for name in table_targets}
            config, refinement = refine_to_measured(
                config,
                supernet,
                bundle,
                tables,
                targets_ms=measured_targets,
                measure=lambda model: measure_on_devices(links, model, bundle),
                scales=scales,
                rounds=refine_rounds,
                steps=refine_steps,
                tolerance=tolerance,
                compact=lambda space_: compact_searched(space_, multiple=channel_multiple, threshold=threshold),
            )
        knob = WidthKnob(supernet, multiple=channel_multiple, threshold=threshold)
        predict = knob.predictor(tables, calibrations)
        selection: WidthSelection | None = None
        plan = knob.searched
        if measure and max_measurements:
            selection = select_width(
                knob,
                lambda model: measure_on_devices(links, model, bundle),
                measured_targets,
                predict=predict,
                tolerance=tolerance,
                max_measurements=max_measurements,
            )
            plan = selection.plan
            _record_in_checkpoint(
                out / CHECKPOINT_NAME, supernet, width_scale=plan.scale, operator_level=plan.operators
            )
    compact, arch = knob.compact(plan)
    knob.restore()
    if retrain:
        compact = retrain_from_scratch(compact, bundle, finetune_steps, batch_size=batch_size, seed=seed, progress=True)
    elif finetune_steps:
        finetune(compact, bundle, finetune_steps, batch_size=batch_size, seed=seed, progress=True)
    report = _export_all(
        compact, arch, bundle, out, result.keep_probabilities, result.history, config.target_latency_ms
    )
    report["search"] = {
        "steps_done": result.steps_done,
        "converged": result.converged,
        "wall_seconds": result.wall_seconds,
        "cost_seconds": result.cost_seconds,
        "expected_costs": result.final_costs,
        "supernet_val_accuracy": result.val_accuracy,
    }
    report["calibration"] = {
        name: {"offset_ms": c.offset_ms, "scale": c.scale, "points": c.points} for name, c in calibrations.items()
    }
    report["table_targets_ms"] = config.target_latency_ms
    report["refinement"] = [asdict(r) for r in refinement]
    report["width_selection"] = asdict(selection) if selection is not None else None
    report["devices"] = []
    if measure:
        onnx = (out / "model.onnx").read_bytes()
        report["devices"] = verify_on_devices(links, onnx, measured_targets, predict(plan), err_console)
        _print_device_table(report["devices"])
    (out / "report.json").write_text(json.dumps(report, indent=2))
    console.print(f"wrote {out}/arch.json, model.onnx, model.pt, keep_probabilities.png, trajectory.png, report.json")


def _calibrations(
    links: list[DeviceLink], space: str, bundle: DataBundle, out: Path, *, resume: bool, enabled: bool, multiple: int
) -> dict[str, LatencyCalibration]:
    """Calibrate each device, or reuse the calibration a resumed search started with (its targets depend on it)."""
    if not enabled:
        return {}
    path = out / "calibration.json"
    if resume and path.is_file():
        stored = json.loads(path.read_text())
        if set(stored) == {link.name for link in links}:
            return {
                name: LatencyCalibration(c["offset_ms"], c["scale"], tuple(map(tuple, c["points"])))
                for name, c in stored.items()
            }
    calibrations = calibrate_devices(links, space, bundle, err_console, multiple=multiple)
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({name: asdict(c) for name, c in calibrations.items()}, indent=2))
    return calibrations


def _record_in_checkpoint(path: Path, supernet: torch.nn.Module, **meta: Any) -> None:
    """Store the supernet the width was chosen from (refinement rounds train on after the checkpoint) and the choice,
    so that ``figs export`` rebuilds the network this search exported."""
    state = torch.load(path, weights_only=False)
    state["space"] = supernet.state_dict()
    state["meta"].update(meta)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def _shape(bundle: DataBundle) -> dict[str, int]:
    return {"in_channels": bundle.in_channels, "num_classes": bundle.num_classes, "image_size": bundle.image_size}


def _export_all(
    compact: torch.nn.Module,
    arch: dict[str, Any],
    bundle: DataBundle,
    out: Path,
    probabilities: dict[str, list[float]],
    history: list[dict[str, float]],
    targets: dict[str, float],
) -> dict[str, Any]:
    write_architecture(arch, out / "arch.json")
    torch.save(compact.state_dict(), out / "model.pt")
    export_onnx(compact, out / "model.onnx", in_channels=bundle.in_channels, image_size=bundle.image_size)
    if probabilities:
        plot_keep_probabilities(probabilities, out / "keep_probabilities.png")
    if history:
        plot_trajectory(history, out / "trajectory.png", targets_ms=targets)
    split = bundle.test if bundle.test is not None else bundle.val
    result = evaluate(compact, split)
    params = sum(p.numel() for p in compact.parameters())
    return {"accuracy": result.accuracy, "accuracy_split": "test" if bundle.test else "val", "params": params}


def _print_device_table(rows: list[dict[str, Any]]) -> None:
    table = Table(title="exported model on each device")
    for column in ("device", "target ms", "expected ms", "predicted ms", "measured ms", "measured/target"):
        table.add_column(column, justify="right" if column != "device" else "left")

    def fmt(value: Any) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value if value is not None else "—")

    for row in rows:
        ratio = row["measured_ms"] / row["target_ms"] if isinstance(row.get("measured_ms"), float) else None
        table.add_row(
            row["device"],
            fmt(row["target_ms"]),
            fmt(row.get("expected_ms")),
            fmt(row.get("predicted_ms")),
            fmt(row.get("measured_ms")),
            fmt(ratio),
        )
    console.print(table)


@app.command("export")
def export_command(
    checkpoint: Annotated[Path, typer.Option(help="a search checkpoint (OUT/checkpoint.pt)")],
    out: Annotated[Path, typer.Option(help="output directory")],
    threshold: Annotated[float | None, typer.Option(help="default: the search's threshold")] = None,
) -> None:
    """Compact a searched supernet from its checkpoint and export arch.json, model.onnx and model.pt (no fine-tune)."""
    with user_errors():
        if checkpoint.is_dir():
            checkpoint = checkpoint / CHECKPOINT_NAME
        supernet, meta = load_checkpoint_space(checkpoint)
        threshold = threshold if threshold is not None else meta.get("threshold", 0.5)
        if not 0 < threshold < 1:
            raise ValueError(f"--threshold: must be in (0, 1), got {threshold}")
        knob = WidthKnob(supernet, multiple=meta.get("channel_multiple", 1), threshold=threshold)
        # A search that measured its way to a width recorded the scale and operator level; older checkpoints mean
        # the searched network.
        compact, arch = knob.compact(knob.plan_at(meta.get("width_scale", 1.0), meta.get("operator_level", 0)))
        out.mkdir(parents=True, exist_ok=True)
        write_architecture(arch, out / "arch.json")
        torch.save(compact.state_dict(), out / "model.pt")
        export_onnx(compact, out / "model.onnx", in_channels=meta["in_channels"], image_size=meta["image_size"])
    console.print(f"wrote {out}/arch.json, model.onnx, model.pt")


@app.command("evaluate")
def evaluate_command(
    arch: Annotated[Path, typer.Option(help="architecture JSON written by search or export")],
    weights: Annotated[Path, typer.Option(help="model.pt written next to it")],
    data: Annotated[str, typer.Option(help="digits, mnist5k, or a directory")] = "digits",
    split: Annotated[str, typer.Option(help="val or test")] = "test",
    seed: Annotated[int, typer.Option(help="the split seed used by the search")] = 0,
) -> None:
    """Accuracy of an exported compact network on a data split."""
    with user_errors():
        if split not in ("val", "test"):
            raise ValueError(f"--split: must be val or test, got {split!r}")
        architecture = read_architecture(arch)
        model = from_architecture(architecture)
        if not weights.is_file():
            raise FileNotFoundError(f"--weights: {weights} does not exist")
        model.load_state_dict(torch.load(weights, weights_only=True))
        bundle = load_dataset(data, seed=seed)
        dataset = bundle.test if split == "test" else bundle.val
        if dataset is None:
            raise ValueError(f"--split: {data} has no {split} split")
        result = evaluate(model, dataset)
    console.print(json.dumps({"accuracy": result.accuracy, "loss": result.loss, "n": result.n}))


if __name__ == "__main__":  # pragma: no cover - `python -m search.cli`
    app(prog_name="figs")


__all__ = ["app"]
