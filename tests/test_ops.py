"""The operator catalogue: parsing, validation naming the field, canonical JSON and stable keys."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from predictors.ops import ACTIVATIONS, OPERATORS, Concat, Conv2d, Linear, OpSpecError, op_from_dict

EXAMPLES: dict[str, dict] = {
    "conv2d": {"cin": 32, "cout": 64, "hw": 56, "k": 3, "stride": 1},
    "linear": {"cin": 128, "cout": 10},
    "batchnorm": {"c": 16, "hw": 28},
    "maxpool": {"c": 16, "hw": 28, "k": 3, "stride": 2},
    "avgpool": {"c": 16, "hw": 28},
    "global_avgpool": {"c": 16, "hw": 7},
    "add": {"c": 16, "hw": 28},
    "mul": {"c": 16, "hw": 28},
    "concat": {"cins": [8, 16, 24], "hw": 14},
    "channel_shuffle": {"c": 16, "hw": 14, "groups": 4},
    **{act: {"c": 8, "hw": 14} for act in ACTIVATIONS},
}


def test_every_registered_kind_has_an_example() -> None:
    assert set(EXAMPLES) == set(OPERATORS)


@pytest.mark.parametrize("kind", sorted(EXAMPLES))
def test_round_trip_through_canonical_json(kind: str) -> None:
    spec = op_from_dict({"op": kind, **EXAMPLES[kind]})
    again = op_from_dict(json.loads(spec.canonical_json()))
    assert again == spec
    assert again.key == spec.key
    assert spec.flops() > 0
    assert spec.bytes_moved() > 0


def test_key_is_stable_across_processes_and_field_order() -> None:
    spec = op_from_dict({"stride": 2, "k": 3, "hw": 28, "cout": 24, "cin": 16, "op": "conv2d"})
    code = (
        "from predictors.ops import op_from_dict;"
        "print(op_from_dict({'op':'conv2d','cin':16,'cout':24,'hw':28,'k':3,'stride':2}).key)"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert other == spec.key
    assert spec.key != spec.replace(cout=25).key


def test_defaults_are_part_of_the_canonical_form() -> None:
    spec = op_from_dict({"op": "conv2d", "cin": 8, "cout": 8, "hw": 8})
    data = json.loads(spec.canonical_json())
    assert data["batch"] == 1 and data["dtype"] == "float32" and data["k"] == 3 and data["act"] is None


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"op": "conv2d", "cin": 0, "cout": 8, "hw": 8}, "cin"),
        ({"op": "conv2d", "cin": 8, "cout": -1, "hw": 8}, "cout"),
        ({"op": "conv2d", "cin": 8, "cout": 8, "hw": 4, "k": 7}, "k"),
        ({"op": "conv2d", "cin": 6, "cout": 8, "hw": 8, "groups": 4}, "groups"),
        ({"op": "conv2d", "cin": 8, "cout": 8, "hw": 8, "act": "gelu"}, "act"),
        ({"op": "conv2d", "cin": 8, "cout": 8}, "hw"),
        ({"op": "conv2d", "cin": 8, "cout": 8, "hw": 8, "padding": 1}, "padding"),
        ({"op": "conv2d", "cin": 8.5, "cout": 8, "hw": 8}, "cin"),
        ({"op": "conv2d", "cin": True, "cout": 8, "hw": 8}, "cin"),
        ({"op": "conv2d", "cin": 4096, "cout": 4096, "hw": 4096}, "hw"),
        ({"op": "linear", "cin": 8, "cout": 8, "dtype": "float16"}, "dtype"),
        ({"op": "concat", "cins": [8], "hw": 8}, "cins"),
        ({"op": "channel_shuffle", "c": 10, "hw": 8, "groups": 4}, "groups"),
        ({"op": "transformer", "d": 8}, "op"),
        ({"cin": 8}, "op"),
    ],
)
def test_invalid_specs_name_the_field(body: dict, field: str) -> None:
    with pytest.raises(OpSpecError) as info:
        op_from_dict(body)
    assert info.value.field == field


def test_element_cap_is_configurable() -> None:
    body = {"op": "relu", "c": 64, "hw": 64}
    op_from_dict(body)
    with pytest.raises(OpSpecError):
        op_from_dict(body, max_elements=1000)


def test_conv_shapes_and_costs() -> None:
    conv = Conv2d(cin=32, cout=64, hw=56, k=3, stride=2)
    assert conv.output_shape() == (1, 64, 28, 28)
    assert conv.flops() == 2 * 64 * 28 * 28 * 32 * 9
    depthwise = Conv2d(cin=32, cout=32, hw=56, k=3, groups=32)
    assert depthwise.depthwise and not conv.depthwise
    assert depthwise.flops() == 2 * 32 * 56 * 56 * 9
    assert depthwise.resized(16, 16) == Conv2d(cin=16, cout=16, hw=56, k=3, groups=16)
    assert Linear(cin=10, cout=20).resized(5, 7).params() == 5 * 7 + 7
    assert Concat(cins=(3, 5), hw=4).output_shape() == (1, 8, 4, 4)
