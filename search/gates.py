"""Stochastic channel and operator gates (FiGS utilisation variables) and the channel sources built from them.

Every gated operator owns one :class:`ChannelGate` with a learned log-odds per output channel.  A *channel source*
is anything that says, per channel of a tensor, how likely the channel is alive and what its current mask is:
a gate, a :class:`GateGroup` (channels tied by a residual add: alive when any member is), an
:class:`OperatorGated` source (a gate behind a whole-operator gate) or a :class:`GateConcat` (concatenation).
Cost models consume sources through :meth:`ChannelSource.count_pmf`, the distribution of the number of live
channels; masking layers consume them through :meth:`ChannelSource.mask`.

Masks are sampled once per training step (``refresh``), shared over the batch and spatial positions, and read by
every :class:`MaskLayer` that uses the source, so tied consumers see the same sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from search.channel_sources import AnyOf, ChannelSource, GateConcat, GateGroup, OnOff, OperatorGated
from search.expected import poisson_binomial_pmf

Estimator = Literal["concrete", "hard_concrete", "reinforce"]
ESTIMATORS: tuple[str, ...] = ("concrete", "hard_concrete", "reinforce")

# Hard-concrete constants from Louizos et al. (arXiv 1712.01312).
HARD_CONCRETE_GAMMA = -0.1
HARD_CONCRETE_ZETA = 1.1
HARD_CONCRETE_BETA = 2.0 / 3.0
_HARD_CONCRETE_SHIFT = HARD_CONCRETE_BETA * math.log(-HARD_CONCRETE_GAMMA / HARD_CONCRETE_ZETA)
_UNIFORM_EPS = 1e-6


@dataclass
class GateConfig:
    """How gates sample and relax.

    ``temperature`` defaults to 0.1, not morph-net's 0.001.  Measured with ``search.trainer.run_search`` on digits
    (blocks space, 300 steps, FLOPs-shaped latency table, target ½ of full, 2 seeds): τ = 0.001 missed the target
    (expected latency 0.69× target: the task gradient cannot reach log-odds through a step function, so only the
    cost term moves them) and its supernet scored 22 % before fine-tuning; τ = 0.1 landed at 1.00× with 60 %;
    τ = 0.5 at 1.00× with 30 % (soft masks skew the BN statistics); τ = 1.0 at 0.97× with 17 %; straight-through at
    τ = 0.5 at 0.93× with 55 %; hard-concrete at 0.89× with 35 %.  After a 60-step fine-tune all reached 98–99 %.
    Annealing: ``tau(step) = max(min_temperature, temperature * decay ** (step / decay_steps))``.
    """

    estimator: Estimator = "concrete"
    temperature: float = 0.1
    decay: float = 1.0
    decay_steps: int = 1000
    min_temperature: float = 1e-3
    straight_through: bool = False
    init_log_odds: float = 2.5
    keep_first_alive: bool = True
    # Every channel always on and nothing learned: the uniform width-multiplier baseline of the same space.
    fixed_on: bool = False

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator: must be one of {', '.join(ESTIMATORS)}, got {self.estimator!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature: must be positive, got {self.temperature}")
        if not 0 < self.decay <= 1:
            raise ValueError(f"decay: must be in (0, 1], got {self.decay}")
        if self.decay_steps <= 0:
            raise ValueError(f"decay_steps: must be positive, got {self.decay_steps}")

    def temperature_at(self, step: int) -> float:
        return max(self.min_temperature, self.temperature * self.decay ** (step / self.decay_steps))


class _StraightThrough(torch.autograd.Function):
    """Forward the exact hard mask, backward the relaxed mask's gradient (``hard + soft - soft.detach()`` is off
    by one ulp in float32, so compacted and supernet outputs would not match bit for bit)."""

    @staticmethod
    def forward(ctx: object, hard: Tensor, soft: Tensor) -> Tensor:
        return hard.clone()

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> tuple[None, Tensor]:
        return None, grad


def straight_through(hard: Tensor, soft: Tensor) -> Tensor:
    out: Tensor = _StraightThrough.apply(hard, soft)
    return out


def logistic_noise(shape: tuple[int, ...], *, device: torch.device, dtype: torch.dtype) -> Tensor:
    u = torch.rand(shape, device=device, dtype=dtype).clamp(_UNIFORM_EPS, 1 - _UNIFORM_EPS)
    return torch.log(u) - torch.log1p(-u)


class _Sampled(nn.Module):
    """Shared plumbing: a learned log-odds vector, the current sample and the annealing step."""

    def __init__(self, n: int, config: GateConfig, name: str) -> None:
        super().__init__()
        if n <= 0:
            raise ValueError(f"n: a gate needs at least one channel, got {n}")
        self.config = config
        self.gate_name = name
        self.log_odds = nn.Parameter(torch.full((n,), float(config.init_log_odds)), requires_grad=not config.fixed_on)
        self.step = 0
        self._mask: Tensor | None = None
        self.last_sample: Tensor | None = None
        # Counts refreshes so that cost caches know a new step (a new forward pass) has begun.
        self.refresh_count = 0

    @property
    def n(self) -> int:
        return int(self.log_odds.numel())

    @property
    def temperature(self) -> float:
        return self.config.temperature_at(self.step)

    def set_step(self, step: int) -> None:
        self.step = int(step)

    def _pinned(self) -> Tensor | None:
        """Index mask of channels forced alive (the first one, so an operator never vanishes through its gate)."""
        return None

    def keep_probability(self) -> Tensor:
        """P(channel alive), differentiable in the log-odds."""
        logits: Tensor = self.log_odds
        if self.config.fixed_on:
            return torch.ones_like(logits)
        if self.config.estimator == "hard_concrete":
            logits = logits - _HARD_CONCRETE_SHIFT
        p = torch.sigmoid(logits)
        pinned = self._pinned()
        return p if pinned is None else torch.where(pinned, torch.ones_like(p), p)

    def alive(self, threshold: float = 0.5) -> Tensor:
        alive = self.keep_probability().detach() > threshold
        pinned = self._pinned()
        return alive if pinned is None else alive | pinned

    def expected_count(self) -> Tensor:
        return self.keep_probability().sum()

    def count_pmf(self, cache: dict[int, Tensor] | None = None) -> Tensor:
        if cache is not None and id(self) in cache:
            return cache[id(self)]
        return poisson_binomial_pmf(self.keep_probability())

    def sample(self) -> Tensor:
        """One relaxed (or exact, for REINFORCE) mask of shape ``[n]``."""
        logits = self.log_odds
        if self.config.fixed_on:
            self.last_sample = torch.ones_like(logits)
            return self.last_sample
        noise = logistic_noise(tuple(logits.shape), device=logits.device, dtype=logits.dtype)
        estimator = self.config.estimator
        if estimator == "reinforce":
            mask = torch.bernoulli(torch.sigmoid(logits.detach()))
        elif estimator == "concrete":
            mask = torch.sigmoid((logits + noise) / self.temperature)
            if self.config.straight_through:
                mask = straight_through((logits + noise > 0).to(mask.dtype), mask)
        else:
            stretched = torch.sigmoid((logits + noise) / HARD_CONCRETE_BETA)
            stretched = stretched * (HARD_CONCRETE_ZETA - HARD_CONCRETE_GAMMA) + HARD_CONCRETE_GAMMA
            mask = stretched.clamp(0.0, 1.0)
            if self.config.straight_through:
                mask = straight_through((mask > 0.5).to(mask.dtype), mask)
        pinned = self._pinned()
        if pinned is not None:
            mask = torch.where(pinned, torch.ones_like(mask), mask)
        self.last_sample = mask.detach()
        return mask

    def deterministic_mask(self, threshold: float = 0.5) -> Tensor:
        return self.alive(threshold).to(self.log_odds.dtype)

    def refresh(self) -> None:
        """Draw this step's mask in training mode; use the deterministic mask in eval mode."""
        self._mask = self.sample() if self.training else self.deterministic_mask()
        self.refresh_count += 1

    def mask(self) -> Tensor:
        if self._mask is None:
            self.refresh()
        assert self._mask is not None
        return self._mask

    def log_prob(self, mask: Tensor | None = None) -> Tensor:
        """Bernoulli log-likelihood of ``mask`` (default: the last sample), for the REINFORCE estimator."""
        sample = self.last_sample if mask is None else mask
        if sample is None:
            raise RuntimeError(f"{self.gate_name}: log_prob before any sample")
        logits = self.log_odds
        terms = sample * nn.functional.logsigmoid(logits) + (1 - sample) * nn.functional.logsigmoid(-logits)
        pinned = self._pinned()
        if pinned is not None:
            terms = terms.masked_fill(pinned, 0.0)
        return terms.sum()


class ChannelGate(_Sampled):
    """One gate per output channel (or neuron) of an operator."""

    pinned: Tensor

    def __init__(self, n: int, config: GateConfig | None = None, name: str = "gate") -> None:
        super().__init__(n, config or GateConfig(), name)
        pinned = torch.zeros(n, dtype=torch.bool)
        pinned[0] = self.config.keep_first_alive
        self.register_buffer("pinned", pinned, persistent=False)

    def _pinned(self) -> Tensor | None:
        return self.pinned if self.config.keep_first_alive else None

    def extra_repr(self) -> str:
        return f"{self.gate_name}, n={self.n}, estimator={self.config.estimator}"


class OperatorGate(_Sampled):
    """A single gate that switches a whole operator (one branch of a block) on or off."""

    def __init__(self, config: GateConfig | None = None, name: str = "operator") -> None:
        super().__init__(1, config or GateConfig(), name)

    def probability(self) -> Tensor:
        return self.keep_probability()[0]

    def is_on(self, threshold: float = 0.5) -> bool:
        return bool(self.alive(threshold)[0])

    def extra_repr(self) -> str:
        return f"{self.gate_name}, estimator={self.config.estimator}"


class MaskLayer(nn.Module):
    """Multiplies a ``[B, C, H, W]`` or ``[B, C]`` tensor by its source's current mask."""

    source: ChannelSource

    def __init__(self, source: ChannelSource) -> None:
        super().__init__()
        # A plain attribute, not a submodule: the gate's parameters belong to the space's gate list once.
        self.__dict__["source"] = source

    def forward(self, x: Tensor) -> Tensor:
        mask = self.source.mask().to(x.dtype)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * mask.view(shape)


class ReinforceBaseline:
    """Exponential moving average of the loss, subtracted from it to cut the REINFORCE estimator's variance."""

    def __init__(self, decay: float = 0.9) -> None:
        if not 0 <= decay < 1:
            raise ValueError(f"decay: must be in [0, 1), got {decay}")
        self.decay = decay
        self.value: float | None = None

    def advantage(self, loss: Tensor) -> float:
        """``loss − baseline`` for this step, then fold the loss into the baseline."""
        current = float(loss.detach())
        advantage = 0.0 if self.value is None else current - self.value
        self.value = current if self.value is None else self.decay * self.value + (1 - self.decay) * current
        return advantage


def reinforce_surrogate(gates: list[ChannelGate | OperatorGate], loss: Tensor, baseline: ReinforceBaseline) -> Tensor:
    """A term whose gradient is the REINFORCE estimate of d E[loss] / d log-odds for the REINFORCE gates.

    Add it to the loss for its gradient; its value means nothing, so leave it out of logged losses.
    """
    advantage = baseline.advantage(loss)
    terms = [g.log_prob() for g in gates if g.config.estimator == "reinforce" and g.last_sample is not None]
    if not terms:
        return loss.new_zeros(())
    return advantage * torch.stack(terms).sum()


__all__ = [
    "ESTIMATORS",
    "AnyOf",
    "ChannelGate",
    "ChannelSource",
    "GateConcat",
    "GateConfig",
    "GateGroup",
    "MaskLayer",
    "OnOff",
    "OperatorGate",
    "OperatorGated",
    "ReinforceBaseline",
    "logistic_noise",
    "reinforce_surrogate",
]
