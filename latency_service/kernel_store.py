"""Store functions of whole-model prediction: profiled networks and their kernel samples, fusion rules, and the
fitted kernel predictors.  Like ``latency_service.store``: keyword-only, the caller's session, no commits."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from latency_service.fusion_rules import FusionRule
from latency_service.kernel_fit import KernelPredictor
from latency_service.kernel_models import FusionRuleRow, KernelPredictorRow, KernelSampleRow, ProfiledNetworkRow
from latency_service.kernel_profiling import KernelSample, ProfiledNetwork
from predictors.kernels import kernel_bytes


class NoKernelPredictorError(LookupError):
    """No kernel predictor has been fitted for this device class yet (run the ``standard`` preset)."""


def latest_kernel_predictor(*, session: Session, device_class: str) -> tuple[KernelPredictor, KernelPredictorRow]:
    row = session.scalars(
        select(KernelPredictorRow)
        .where(KernelPredictorRow.device_class == device_class)
        .order_by(KernelPredictorRow.id.desc())
        .limit(1)
    ).first()
    if row is None:
        raise NoKernelPredictorError(
            f"no whole-model predictor for device class {device_class}: run the 'standard' preset first"
        )
    return KernelPredictor.from_json(row.payload), row


def save_profiled_networks(
    *, session: Session, device_id: str, networks: Sequence[ProfiledNetwork], environment: dict[str, Any]
) -> int:
    """Store networks and their reconciled kernel samples (caller commits); returns the number of samples."""
    count = 0
    for network in networks:
        row = ProfiledNetworkRow(
            device_id=device_id,
            network_id=network.network_id,
            description=network.description,
            wall_ms=network.wall_ms,
            overhead_ms=network.overhead_ms,
            n_kernels=len(network.kernels),
            environment=environment,
        )
        session.add(row)
        session.flush()
        for sample in network.samples():
            session.add(
                KernelSampleRow(
                    network_row_id=row.id,
                    device_id=device_id,
                    kernel_class=sample.kernel_class,
                    op_type=sample.op_type,
                    features=list(sample.features),
                    latency_ms=sample.latency_ms,
                    profiled_ms=sample.profiled_ms,
                )
            )
            count += 1
    session.flush()
    return count


def save_fusion_rules(*, session: Session, device_id: str, rules: Sequence[FusionRule]) -> None:
    for rule in rules:
        session.add(
            FusionRuleRow(
                device_id=device_id,
                first_op=rule.first,
                second_op=rule.second,
                fused=rule.fused,
                first_ms=rule.first_ms,
                second_ms=rule.second_ms,
                chained_ms=rule.chained_ms,
                kernels_in_chain=rule.kernels_in_chain,
            )
        )
    session.flush()


def latest_fusion_rules(*, session: Session, device_id: str) -> list[FusionRuleRow]:
    """The newest measurement of every operator pair on this device."""
    rows = session.scalars(
        select(FusionRuleRow).where(FusionRuleRow.device_id == device_id).order_by(FusionRuleRow.id.desc())
    ).all()
    newest: dict[tuple[str, str], FusionRuleRow] = {}
    for row in rows:
        newest.setdefault((row.first_op, row.second_op), row)
    return list(newest.values())


def clear_kernel_samples(*, session: Session, device_id: str) -> None:
    """Forget a device's in-context samples (a forced re-profile replaces them rather than mixing runs)."""
    session.execute(delete(KernelSampleRow).where(KernelSampleRow.device_id == device_id))
    session.execute(delete(ProfiledNetworkRow).where(ProfiledNetworkRow.device_id == device_id))


def stored_kernel_samples(*, session: Session, device_id: str) -> tuple[list[KernelSample], float]:
    """The device's stored samples and the median per-run constant of their networks."""
    rows = session.execute(
        select(KernelSampleRow, ProfiledNetworkRow.network_id, ProfiledNetworkRow.overhead_ms)
        .join(ProfiledNetworkRow, ProfiledNetworkRow.id == KernelSampleRow.network_row_id)
        .where(KernelSampleRow.device_id == device_id)
    ).all()
    # A network's footprint from its stored kernels: every kernel with a bytes feature has a class, so is stored.
    footprints: dict[int, float] = {}
    for r, _, _ in rows:
        footprints[r.network_row_id] = footprints.get(r.network_row_id, 0.0) + kernel_bytes(r.kernel_class, r.features)
    samples = [
        KernelSample(r.kernel_class, r.op_type, tuple(r.features), r.latency_ms, r.profiled_ms, network_id,
                     footprints.get(r.network_row_id, 0.0))
        for r, network_id, _ in rows
    ]  # fmt: skip
    overheads = sorted(overhead for _, _, overhead in rows)
    return samples, (overheads[len(overheads) // 2] if overheads else 0.0)


def save_kernel_predictor(
    *,
    session: Session,
    device_id: str,
    device_class: str,
    predictor: KernelPredictor,
    report: dict[str, Any],
) -> KernelPredictorRow:
    row = KernelPredictorRow(
        device_id=device_id,
        device_class=device_class,
        version=predictor.version,
        method=predictor.method,
        payload=predictor.to_json(),
        report=report,
    )
    session.add(row)
    session.flush()
    return row
