"""Whole-model CLI commands, registered on ``latency-service`` by :func:`register_model_commands`.

``predict-model FILE.onnx`` and ``measure-model FILE.onnx`` work on the local store like ``predict`` does;
``profile-models`` runs the in-context kernel profiling of the ``standard`` preset alone (then fits and stores).
Bad input exits with code 2 and one line naming what was wrong.
"""

from pathlib import Path
from typing import Annotated

import typer


def _read_model(path: Path) -> bytes:
    from latency_service.cli import fail

    try:
        return path.read_bytes()
    except OSError as exc:
        fail(f"model: cannot read {path}: {exc.strerror or exc}")


def register_model_commands(app: typer.Typer) -> None:
    """Add ``predict-model``, ``measure-model`` and ``profile-models`` to the service CLI."""
    from latency_service.cli import (
        BackendOption,
        DataDirOption,
        DbOption,
        ThreadsOption,
        _check_backend,
        _open_store,
        console,
        fail,
        load_settings,
    )

    model_argument = Annotated[Path, typer.Argument(help="ONNX model with static input shapes, batch 1")]

    @app.command("predict-model")
    def predict_model_command(
        model: model_argument, db: DbOption = None, data_dir: DataDirOption = None, backend: BackendOption = None
    ) -> None:
        """Predict a whole ONNX model from the kernels the backend will run (needs the `standard` preset's fit)."""
        from rich.table import Table

        from latency_service.jobs import configured_backend
        from latency_service.kernel_store import NoKernelPredictorError, latest_kernel_predictor
        from latency_service.model_latency import InvalidModelError, predict_with

        settings = load_settings(db_url=db, data_dir=data_dir, backend=backend)
        body = _read_model(model)
        _check_backend(settings.backend)
        session_factory = _open_store(settings)
        with session_factory() as session:
            try:
                predictor, _ = latest_kernel_predictor(session=session, device_class=settings.resolved_device_class)
            except NoKernelPredictorError as exc:
                fail(str(exc), code=1)
        try:
            result = predict_with(predictor, configured_backend(settings), body)
        except InvalidModelError as exc:
            fail(f"model: {exc.message}")
        table = Table(title=f"{model.name}: predicted kernels ({result['method']}, {result['predictor_version']})")
        for column in ("kernel", "ops", "ms", "source"):
            table.add_column(column)
        for kernel in result["kernels"]:
            table.add_row(kernel["name"], "+".join(kernel["ops"]), f"{kernel['latency_ms']:.4f}", kernel["source"])
        console.print(table)
        for item in result["unmodelled"]:
            console.print(f"[yellow]unmodelled[/] {item['name']} ({item['op_type']}): {item['latency_ms']:.4f} ms")
        console.print(
            f"total {result['total_ms']:.4f} ms (per-run constant {result['per_run_overhead_ms']:.4f} ms included)"
        )

    @app.command("measure-model")
    def measure_model_command(
        model: model_argument,
        db: DbOption = None,
        data_dir: DataDirOption = None,
        backend: BackendOption = None,
        threads: ThreadsOption = None,
    ) -> None:
        """Measure a whole ONNX model end to end with the service's protocol and store the measurement."""
        from latency_service import store
        from latency_service.db import transaction
        from latency_service.environment import host_environment
        from latency_service.jobs import MeasuringSession
        from latency_service.measurement_lock import MEASUREMENT_LOCK
        from latency_service.model_latency import InvalidModelError, measure_model

        settings = load_settings(db_url=db, data_dir=data_dir, backend=backend, threads=threads)
        body = _read_model(model)
        _check_backend(settings.backend)
        session_factory = _open_store(settings)
        measuring = MeasuringSession(settings)
        try:
            with MEASUREMENT_LOCK, transaction(session_factory) as session:
                store.upsert_device(
                    session=session,
                    device_id=settings.resolved_device_id,
                    device_class=settings.resolved_device_class,
                    backend=settings.backend,
                    backend_version=measuring.backend.runtime_version,
                    host=host_environment(),
                )
                result = measure_model(
                    body,
                    session=session,
                    device_id=settings.resolved_device_id,
                    backend=measuring.backend,
                    config=measuring.config,
                    overhead_ms=measuring.overhead_ms(),
                    environment=measuring.environment(),
                    model_name=model.name,
                    gate=measuring.gate(),
                )
        except InvalidModelError as exc:
            fail(f"model: {exc.message}")
        console.print(
            f"{model.name}: median {result['median_ms']:.4f} ms (p10 {result['p10_ms']:.4f}, p90 "
            f"{result['p90_ms']:.4f}, n {result['n']}){' [yellow]flagged as noisy[/]' if result['flagged'] else ''}"
        )

    @app.command("profile-models")
    def profile_models_command(
        budget_s: Annotated[float, typer.Option("--budget-s", min=5.0, help="Seconds of in-context profiling")] = 480.0,
        db: DbOption = None,
        data_dir: DataDirOption = None,
        backend: BackendOption = None,
        threads: ThreadsOption = None,
    ) -> None:
        """Profile kernels inside generated networks, fit the whole-model predictor and store it."""
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        from latency_service import store
        from latency_service.db import transaction
        from latency_service.environment import host_environment
        from latency_service.jobs import MeasuringSession
        from latency_service.model_latency import run_in_context_profiling

        settings = load_settings(db_url=db, data_dir=data_dir, backend=backend, threads=threads)
        _check_backend(settings.backend)
        session_factory = _open_store(settings)
        measuring = MeasuringSession(settings)
        with transaction(session_factory) as session:
            store.upsert_device(
                session=session,
                device_id=settings.resolved_device_id,
                device_class=settings.resolved_device_class,
                backend=settings.backend,
                backend_version=measuring.backend.runtime_version,
                host=host_environment(),
            )
        with Progress(TextColumn("[bold]in-context profiling"), BarColumn(), TimeElapsedColumn()) as progress:
            task = progress.add_task("profile", total=budget_s)
            row = run_in_context_profiling(
                session_factory=session_factory,
                measuring=measuring,
                device_id=settings.resolved_device_id,
                device_class=settings.resolved_device_class,
                budget_s=budget_s,
                progress=lambda elapsed, total: progress.update(task, completed=elapsed),
            )
        console.print(
            f"whole-model predictor {row.version} ({row.method}) from {row.report['networks']} networks, "
            f"{row.report['samples']} kernel samples"
        )
        for method in row.report.get("comparison", []):
            console.print(
                f"  {method['method']}: held-out networks within ±10 % {method['network_within_10pct']:.0%}, "
                f"RMSPE {method['network_rmspe']:.1%}"
            )
