"""``latency-service``: serve the HTTP API, or profile, fit and predict locally against the same store.

Bad input (a bad flag value, an unreadable ops file, an invalid spec, an unknown preset or backend) exits with code 2
and one line on stderr naming what was wrong; no traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from latency_service import job_store, store
from latency_service.backends import BACKEND_PATHS, BackendUnavailable, backend_class
from latency_service.config import Settings
from latency_service.db import make_engine, make_session_factory, migrate, transaction
from latency_service.environment import host_environment
from predictors.ops import OpSpec, OpSpecError, op_from_dict

app = typer.Typer(
    name="latency-service",
    help="On-device latency service: profile operator variants, fit predictors, serve predictions over HTTP.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Database schema commands.", no_args_is_help=True)
app.add_typer(db_app, name="db")

console = Console()
BAD_INPUT = 2

DbOption = Annotated[str | None, typer.Option("--db", help="SQLAlchemy URL (default: SQLite in the data dir)")]
DataDirOption = Annotated[Path | None, typer.Option("--data-dir", help="Where the SQLite store lives")]
BackendOption = Annotated[str | None, typer.Option("--backend", help=f"One of {', '.join(BACKEND_PATHS)}")]
ThreadsOption = Annotated[int | None, typer.Option("--threads", help="Intra-op threads of the runtime")]


def fail(message: str, code: int = BAD_INPUT) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def load_settings(**overrides: Any) -> Settings:
    """Settings from FIGS_* variables, overridden by the flags that were given."""
    try:
        return Settings(**{name: value for name, value in overrides.items() if value is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        message = str(first["msg"]).removeprefix("Value error, ")
        field = ".".join(str(part) for part in first["loc"])
        fail(f"{field}: {message}" if field else message)


def read_ops_file(path: Path, *, max_elements: int) -> list[OpSpec]:
    """A JSON list of operator specs, or an object with an ``ops`` list."""
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        fail(f"ops: cannot read {path}: {exc.strerror or exc}")
    except json.JSONDecodeError as exc:
        fail(f"ops: {path} is not valid JSON: {exc.msg} (line {exc.lineno})")
    raw = data.get("ops") if isinstance(data, dict) else data
    if not isinstance(raw, list) or not raw:
        fail(f"ops: {path} must hold a non-empty JSON list of operator specs (or {{'ops': [...]}})")
    ops = []
    for index, item in enumerate(raw):
        try:
            ops.append(op_from_dict(item, max_elements=max_elements))
        except OpSpecError as exc:
            fail(f"ops[{index}].{exc.field}: {exc.message}")
    return ops


def _open_store(settings: Settings) -> sessionmaker[Session]:
    """Open and migrate the store, or exit 2 naming the URL (a typo, an unreachable server, an unwritable path)."""
    url = settings.database_url
    try:
        engine = make_engine(url)
        migrate(url, engine=engine)
    except Exception as exc:  # one line for the user, whatever the driver raised
        reason = str(exc).splitlines()[0] if str(exc) else ""
        fail(f"db: cannot open {_safe_url(url)}: {exc.__class__.__name__}: {reason}")
    return make_session_factory(engine)


def _safe_url(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # an unparsable URL has no password field to hide
        return url


def _check_backend(name: str) -> None:
    try:
        status = backend_class(name).status()
    except KeyError:
        fail(f"backend: unknown backend {name!r}; known: {', '.join(BACKEND_PATHS)}")
    except BackendUnavailable as exc:
        fail(f"backend: {exc}")
    if not status.available:
        fail(f"backend: {name} is not available here: {status.reason}")


@app.command()
def serve(
    db: DbOption = None,
    data_dir: DataDirOption = None,
    host: Annotated[str | None, typer.Option(help="Bind address (default 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 8400)")] = None,
    backend: BackendOption = None,
    token: Annotated[str | None, typer.Option(help="Bearer token required on every route but /v1/health")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="Allow a non-loopback bind without a token")] = False,
    threads: ThreadsOption = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "info",
) -> None:
    """Run the HTTP API (OpenAPI docs at /docs) and this device's job worker."""
    import uvicorn

    from latency_service.api.main import create_app

    settings = load_settings(
        db_url=db,
        data_dir=data_dir,
        host=host,
        port=port,
        backend=backend,
        token=token,
        insecure=insecure or None,
        threads=threads,
    )
    _check_backend(settings.backend)
    # Fail here, with one line, on a database that cannot be reached, rather than in uvicorn's startup.
    _open_store(settings).kw["bind"].dispose()
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=log_level)


@app.command()
def profile(
    preset: Annotated[str | None, typer.Option(help="smoke or standard")] = None,
    ops: Annotated[Path | None, typer.Option("--ops", help="JSON file with a list of operator specs")] = None,
    force: Annotated[bool, typer.Option(help="Measure again variants already measured on this device")] = False,
    db: DbOption = None,
    data_dir: DataDirOption = None,
    backend: BackendOption = None,
    threads: ThreadsOption = None,
) -> None:
    """Measure operator variants here, one at a time, with a progress bar (no server needed)."""
    from latency_service.jobs import MeasuringSession, new_worker_id, run_job_inline
    from latency_service.presets import UnknownPresetError, preset_ops

    settings = load_settings(db_url=db, data_dir=data_dir, backend=backend, threads=threads)
    if (preset is None) == (ops is None):
        fail("give exactly one of --preset and --ops")
    if preset is not None:
        try:
            op_list = preset_ops(preset)
        except UnknownPresetError as exc:
            fail(str(exc))
    else:
        assert ops is not None
        op_list = read_ops_file(ops, max_elements=settings.max_elements)
    _check_backend(settings.backend)
    session_factory = _open_store(settings)
    measuring = MeasuringSession(settings)
    device_id = settings.resolved_device_id
    worker_id = new_worker_id()
    with transaction(session_factory) as session:
        store.upsert_device(
            session=session,
            device_id=device_id,
            device_class=settings.resolved_device_class,
            backend=settings.backend,
            backend_version=measuring.backend.runtime_version,
            host=host_environment(),
        )
        job_id = job_store.create_job(
            session=session, device_id=device_id, ops=op_list, force=force, preset=preset, claimed_by=worker_id
        ).id
    job = run_job_inline(
        worker_id=worker_id,
        job_id=job_id,
        device_id=device_id,
        session_factory=session_factory,
        measuring=measuring,
    )
    with transaction(session_factory) as session:
        skipped = job_store.skipped_counts(session=session, job_ids=[job.id])[job.id]
    console.print(
        f"job {job.id}: {job.status} — {job.done} done ({skipped} measured before), {job.failed} failed "
        f"of {job.total} on {device_id}"
    )
    if job.status == "failed":
        raise typer.Exit(1)


@app.command()
def fit(db: DbOption = None, data_dir: DataDirOption = None, backend: BackendOption = None) -> None:
    """Fit predictors from this device class's measurements and store them."""
    from latency_service.device_fit import fit_device_class

    settings = load_settings(db_url=db, data_dir=data_dir, backend=backend)
    session_factory = _open_store(settings)
    with transaction(session_factory) as session:
        try:
            row = fit_device_class(
                session=session, device_id=settings.resolved_device_id, device_class=settings.resolved_device_class
            )
        except LookupError as exc:
            fail(f"{exc} (latency-service profile --preset smoke)", code=1)
        table = Table(title=f"predictors {row.version} for {row.device_class}")
        for column in ("op", "samples", "CV MAPE", "within ±10 %", "model"):
            table.add_column(column)
        for report in row.reports:
            mape, within = report.get("mape"), report.get("within_10pct")
            table.add_row(
                str(report["op"]),
                str(report["n_samples"]),
                f"{mape:.1%}" if isinstance(mape, float) else "-",
                f"{within:.0%}" if isinstance(within, float) else "-",
                str(report.get("model", "")),
            )
    console.print(table)


@app.command()
def predict(
    ops: Annotated[Path, typer.Option("--ops", help="JSON file with a list of operator specs")],
    db: DbOption = None,
    data_dir: DataDirOption = None,
    backend: BackendOption = None,
) -> None:
    """Print the predicted latency of each operator in a file, and the total."""
    from predictors.fitting import LatencyPredictor, UnmodelledOpError

    settings = load_settings(db_url=db, data_dir=data_dir, backend=backend)
    op_list = read_ops_file(ops, max_elements=settings.max_elements)
    session_factory = _open_store(settings)
    with transaction(session_factory) as session:
        row = store.latest_predictor(session=session, device_class=settings.resolved_device_class)
        if row is None:
            fail("no predictor fitted for this device class yet: run `latency-service fit`", code=1)
        predictor = LatencyPredictor.from_json(row.payload)
    try:
        predictions = predictor.predict(op_list)
    except UnmodelledOpError as exc:
        fail(f"ops: no predictor models kind {getattr(exc, 'kind', exc)!r}; profile it and refit", code=1)
    table = Table(title=f"predicted latency ({settings.resolved_device_class}, predictor {row.version})")
    table.add_column("#", justify="right")
    table.add_column("operator")
    table.add_column("ms", justify="right")
    table.add_column("source")
    for index, (op, (ms, source)) in enumerate(zip(op_list, predictions, strict=True)):
        fields = ", ".join(f"{k}={v}" for k, v in op.to_dict().items() if k not in ("op", "batch", "dtype"))
        table.add_row(str(index), f"{op.kind}({fields})", f"{ms:.4f}", source)
    table.add_row("", "[bold]total", f"[bold]{sum(ms for ms, _ in predictions):.4f}", "")
    console.print(table)


@db_app.command("upgrade")
def db_upgrade(db: DbOption = None, data_dir: DataDirOption = None) -> None:
    """Bring the store to the newest schema (the service also does this at start)."""
    settings = load_settings(db_url=db, data_dir=data_dir)
    _open_store(settings).kw["bind"].dispose()
    console.print(f"schema at head: {_safe_url(settings.database_url)}")


# Whole-model commands (issue 3: predict-model, measure-model, profile-models) live in latency_service/model_cli.py.
from latency_service.model_cli import register_model_commands  # noqa: E402  (needs `app` and `fail` defined above)

register_model_commands(app)
