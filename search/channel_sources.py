"""Channel sources: what cost models and masking layers need to know about the liveness of a tensor's channels.

A source says, per channel, how likely it is alive (``keep_probability``), what this step's mask is (``mask``),
which channels survive compaction (``alive``) and how its live-channel count is distributed (``count_pmf``).
Gates are sources; so are the combinations here: channels tied by an add (:class:`GateGroup`), channels behind a
whole-operator switch (:class:`OperatorGated`) and concatenations (:class:`GateConcat`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from search.expected import poisson_binomial_pmf

if TYPE_CHECKING:
    from search.gates import OperatorGate


@runtime_checkable
class ChannelSource(Protocol):
    """Per-channel liveness of one tensor: probabilities for costs, masks for the forward pass."""

    @property
    def n(self) -> int: ...

    def keep_probability(self) -> Tensor: ...

    def mask(self) -> Tensor: ...

    def alive(self, threshold: float = 0.5) -> Tensor: ...

    def expected_count(self) -> Tensor: ...

    def count_pmf(self, cache: dict[int, Tensor] | None = None) -> Tensor: ...


class GateGroup:
    """Channels tied by a residual add or an add aggregator: a channel lives when any member's channel does.

    P(alive) = 1 − ∏(1 − pᵢ) assumes the members are independent, which holds for distinct gates.  A member behind
    an operator gate (a residual block that may be switched off) correlates its channels through that switch; its
    count pmf here treats them as independent, an approximation the exact-enumeration tests keep out of their cases.
    """

    def __init__(self, members: list[ChannelSource], name: str = "group") -> None:
        if not members:
            raise ValueError("members: a group needs at least one member")
        sizes = {m.n for m in members}
        if len(sizes) != 1:
            raise ValueError(f"members: tied sources must have equal widths, got {sorted(sizes)}")
        self.members = list(members)
        self.name = name

    @property
    def n(self) -> int:
        return self.members[0].n

    def keep_probability(self) -> Tensor:
        dead = torch.stack([1 - m.keep_probability() for m in self.members]).prod(dim=0)
        return 1 - dead

    def mask(self) -> Tensor:
        return torch.stack([m.mask() for m in self.members]).amax(dim=0)

    def alive(self, threshold: float = 0.5) -> Tensor:
        return torch.stack([m.alive(threshold) for m in self.members]).any(dim=0)

    def expected_count(self) -> Tensor:
        return self.keep_probability().sum()

    def count_pmf(self, cache: dict[int, Tensor] | None = None) -> Tensor:
        if cache is not None and id(self) in cache:
            return cache[id(self)]
        return poisson_binomial_pmf(self.keep_probability())


class OnOff(Protocol):
    """A whole-operator switch: one probability, one mask value, one deterministic decision."""

    def probability(self) -> Tensor: ...

    def mask(self) -> Tensor: ...

    def is_on(self, threshold: float = 0.5) -> bool: ...


class AnyOf:
    """On when any of several operator gates is on (a block with a skip runs when any of its operators does)."""

    def __init__(self, gates: list[OperatorGate]) -> None:
        if not gates:
            raise ValueError("gates: needs at least one operator gate")
        self.gates = list(gates)

    def probability(self) -> Tensor:
        return 1 - torch.stack([1 - g.probability() for g in self.gates]).prod()

    def mask(self) -> Tensor:
        return torch.stack([g.mask() for g in self.gates]).amax(dim=0)

    def is_on(self, threshold: float = 0.5) -> bool:
        return any(g.is_on(threshold) for g in self.gates)


class OperatorGated:
    """The channels of an operator that a whole-operator gate can switch off.

    Its count distribution is the exact mixture P(on)·PB(p) + P(off)·δ₀; its per-channel probability P(on)·pᵢ is
    exact per channel, but channels of one operator are correlated through the shared operator gate.
    """

    def __init__(self, inner: ChannelSource, operator_gate: OnOff) -> None:
        self.inner = inner
        self.operator_gate = operator_gate

    @property
    def n(self) -> int:
        return self.inner.n

    def keep_probability(self) -> Tensor:
        return self.operator_gate.probability() * self.inner.keep_probability()

    def mask(self) -> Tensor:
        return self.operator_gate.mask() * self.inner.mask()

    def alive(self, threshold: float = 0.5) -> Tensor:
        return self.inner.alive(threshold) & self.operator_gate.is_on(threshold)

    def expected_count(self) -> Tensor:
        return self.operator_gate.probability() * self.inner.expected_count()

    def count_pmf(self, cache: dict[int, Tensor] | None = None) -> Tensor:
        p_on = self.operator_gate.probability()
        inner = self.inner.count_pmf(cache)
        off = torch.zeros_like(inner)
        off[0] = 1.0
        return p_on * inner + (1 - p_on) * off


class GateConcat:
    """Channels of a concatenation: counts add, so the count distribution is the convolution of the parts'."""

    def __init__(self, parts: list[ChannelSource]) -> None:
        if not parts:
            raise ValueError("parts: a concatenation needs at least one part")
        self.parts = list(parts)

    @property
    def n(self) -> int:
        return sum(p.n for p in self.parts)

    def keep_probability(self) -> Tensor:
        return torch.cat([p.keep_probability() for p in self.parts])

    def mask(self) -> Tensor:
        return torch.cat([p.mask() for p in self.parts])

    def alive(self, threshold: float = 0.5) -> Tensor:
        return torch.cat([p.alive(threshold) for p in self.parts])

    def expected_count(self) -> Tensor:
        return torch.stack([p.expected_count() for p in self.parts]).sum()

    def count_pmf(self, cache: dict[int, Tensor] | None = None) -> Tensor:
        pmf = self.parts[0].count_pmf(cache)
        for part in self.parts[1:]:
            other = part.count_pmf(cache)
            pmf = nn.functional.conv1d(
                pmf.view(1, 1, -1), other.flip(0).view(1, 1, -1), padding=other.numel() - 1
            ).view(-1)
        return pmf


__all__ = ["AnyOf", "ChannelSource", "GateConcat", "GateGroup", "OnOff", "OperatorGated"]
