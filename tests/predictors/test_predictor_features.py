"""Feature vectors: vectorised formulas agree with the catalogue, names match columns, staircase columns are right."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from predictors import ops as O
from predictors.features import compute_columns, feature_matrix, feature_names, feature_vector

EXAMPLES: dict[str, O.OpSpec] = {
    "conv2d": O.Conv2d(cin=24, cout=40, hw=14, k=3, stride=2, bn=True, act="hardswish"),
    "linear": O.Linear(cin=100, cout=10, act="relu"),
    "batchnorm": O.BatchNorm(c=20, hw=7),
    "maxpool": O.MaxPool(c=16, hw=9, k=3, stride=2),
    "avgpool": O.AvgPool(c=16, hw=8),
    "global_avgpool": O.GlobalAvgPool(c=64, hw=7),
    "add": O.Add(c=24, hw=28),
    "mul": O.Mul(c=24, hw=28),
    "concat": O.Concat(cins=(16, 20, 8), hw=14),
    "channel_shuffle": O.ChannelShuffle(c=48, hw=14, groups=2),
    # The activation classes are generated at import, so the type checker cannot see their fields.
    **{a: O.OPERATORS[a](c=18, hw=10) for a in O.ACTIVATIONS},  # type: ignore[call-arg]
}


@pytest.mark.parametrize("kind", sorted(EXAMPLES))
def test_names_match_columns_and_costs_match_the_catalogue(kind: str) -> None:
    op = EXAMPLES[kind]
    names = feature_names(kind)
    row = feature_vector(op)
    assert row.shape == (len(names),)
    assert len(set(names)) == len(names)
    assert np.isfinite(row).all()
    assert row[names.index("flops")] == op.flops()
    assert row[names.index("bytes")] == op.bytes_moved()
    assert set(compute_columns(kind)) <= set(names)


def test_vectorised_conv_features_agree_with_the_catalogue() -> None:
    convs = [
        O.Conv2d(cin=cin, cout=cout, hw=hw, k=k, stride=s, batch=b)
        for cin, cout, hw, k, s, b in itertools.product((3, 16, 24), (8, 24), (7, 15), (1, 3, 5), (1, 2), (1, 2))
        if k <= hw and not (s > k > 1)
    ] + [O.Conv2d(cin=c, cout=c, hw=hw, k=k, groups=c, stride=s) for c in (8, 30) for hw in (7, 14) for k in (3, 5)
         for s in (1, 2)] + [O.Conv2d(cin=32, cout=64, hw=14, k=3, groups=4)]  # fmt: skip
    x = feature_matrix(convs)
    names = feature_names("conv2d")
    for op, row in zip(convs, x, strict=True):
        assert row[names.index("flops")] == op.flops()
        assert row[names.index("bytes")] == op.bytes_moved()
        assert row[names.index("params")] == op.params()
        assert row[names.index("out_hw")] == op.out_hw
        assert row[names.index("depthwise")] == float(op.depthwise)


def test_vectorised_linear_features_agree_with_the_catalogue() -> None:
    layers = [O.Linear(cin=cin, cout=cout, batch=b) for cin in (1, 17, 512) for cout in (3, 1000) for b in (1, 4)]
    x = feature_matrix(layers)
    names = feature_names("linear")
    assert list(x[:, names.index("flops")]) == [op.flops() for op in layers]
    assert list(x[:, names.index("bytes")]) == [op.bytes_moved() for op in layers]


def test_staircase_columns() -> None:
    names = feature_names("conv2d")
    row = feature_vector(O.Conv2d(cin=20, cout=33, hw=28, k=1))
    value = dict(zip(names, row, strict=True))
    assert (value["cin_mod16"], value["cin_mod8"], value["cin_mod4"]) == (4, 4, 0)
    assert (value["cout_ceil8"], value["cout_ceil16"]) == (40, 48)
    assert value["flops_pad16"] == 2 * 28 * 28 * 32 * 48
    depthwise = dict(zip(names, feature_vector(O.Conv2d(cin=20, cout=20, hw=28, k=3, groups=20)), strict=True))
    assert depthwise["depthwise"] == 1
    assert depthwise["flops_pad16"] == 2 * 28 * 28 * 9 * 32


def test_activation_one_hot() -> None:
    names = feature_names("conv2d")
    value = dict(zip(names, feature_vector(O.Conv2d(cin=8, cout=8, hw=8, act="silu")), strict=True))
    assert value["has_act"] == 1 and value["act_silu"] == 1 and value["act_relu"] == 0
    plain = dict(zip(names, feature_vector(O.Conv2d(cin=8, cout=8, hw=8)), strict=True))
    assert plain["has_act"] == 0 and sum(plain[f"act_{a}"] for a in O.ACTIVATIONS) == 0


def test_mixed_kinds_and_empty_input_are_refused() -> None:
    with pytest.raises(ValueError, match="one kind"):
        feature_matrix([EXAMPLES["conv2d"], EXAMPLES["add"]])
    with pytest.raises(ValueError, match="at least one"):
        feature_matrix([])
    with pytest.raises(KeyError):
        feature_names("transformer")
