"""Search spaces: shapes, latency layers, and compaction that reproduces the masked supernet exactly."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from search.spaces.base import SearchSpace, create_space, from_architecture, list_spaces
from search.spaces.compact import ArchitectureError, architecture_ops, validate_architecture
from search.spaces.from_module import UnsupportedModuleError, space_from_module

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> None:
    torch.set_num_threads(1)


def randomise(space: nn.Module, seed: int, *, log_odds_mean: float = 0.3) -> None:
    """Random gates (some channels and operators dead) and random BN statistics, so compaction has work to do."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in space.modules():
            if isinstance(module, nn.BatchNorm2d):
                assert module.running_mean is not None and module.running_var is not None
                module.running_mean.copy_(torch.randn(module.num_features, generator=gen) * 0.1)
                module.running_var.copy_(torch.rand(module.num_features, generator=gen) + 0.5)
                module.weight.copy_(torch.randn(module.num_features, generator=gen))
                module.bias.copy_(torch.randn(module.num_features, generator=gen) * 0.5)
        assert isinstance(space, SearchSpace)
        for gate in space.gates():
            gate.log_odds.copy_(torch.randn(gate.n, generator=gen) * 2.0 + log_odds_mean)


def assert_compaction_is_exact(space: SearchSpace, x: torch.Tensor) -> dict:
    space.eval()
    with torch.no_grad():
        expected = space(x)
        network, arch = space.compact(threshold=0.5)
        network.eval()
        got = network(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not any("gate" in name or "log_odds" in name for name, _ in network.named_parameters())
    return arch


def test_registry_lists_builtin_spaces_and_rejects_unknown() -> None:
    assert {"blocks", "cells"} <= set(list_spaces())
    with pytest.raises(ValueError, match="space"):
        create_space("nope", in_channels=1, num_classes=10, image_size=8)
    with pytest.raises(ValueError, match="widht"):
        create_space("blocks", in_channels=1, num_classes=10, image_size=8, widht=2)
    with pytest.raises(ValueError, match="image_size"):
        create_space("blocks", in_channels=1, num_classes=10, image_size=0)


@pytest.mark.parametrize("aggregator", ["concat", "add"])
@pytest.mark.parametrize("size", [8, 28])
def test_blocks_forward_shapes_and_latency_layers(aggregator: str, size: int) -> None:
    space = create_space("blocks", in_channels=1, num_classes=10, image_size=size, aggregator=aggregator)
    out = space(torch.randn(3, 1, size, size))
    assert out.shape == (3, 10)
    layers = space.latency_layers()
    assert layers[0].cin_source is None and layers[-1].cout_source is None
    for layer in layers:
        cin_counts, cout_counts = layer.count_grid(4)
        assert cout_counts[-1] == layer.cout and (not layer.output_gated or cout_counts[0] == 1)
        table = layer.dense_table(cin_counts, cout_counts, torch.ones(len(cin_counts), len(cout_counts)))
        assert tuple(table.shape) == layer.table_shape
    gate_ids = {id(p) for p in space.gate_parameters()}
    assert gate_ids and not gate_ids & {id(p) for p in space.weight_parameters()}


@pytest.mark.parametrize("aggregator", ["concat", "add"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_blocks_compact_network_equals_masked_supernet(aggregator: str, seed: int) -> None:
    torch.manual_seed(seed)
    space = create_space("blocks", in_channels=1, num_classes=10, image_size=8, aggregator=aggregator)
    randomise(space, seed)
    arch = assert_compaction_is_exact(space, torch.randn(4, 1, 8, 8))
    full = sum(p.numel() for p in space.weight_parameters())
    compact = sum(p.numel() for p in from_architecture(arch).parameters())
    assert compact < full


@pytest.mark.parametrize("size", [8, 28])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_cells_compact_network_equals_masked_supernet(size: int, seed: int) -> None:
    space = create_space("cells", in_channels=1, num_classes=10, image_size=size)
    assert space(torch.randn(2, 1, size, size)).shape == (2, 10)
    randomise(space, seed)
    arch = assert_compaction_is_exact(space, torch.randn(3, 1, size, size))
    assert any(node["op"] == "add" for node in arch["nodes"]) or any(n["op"] == "concat" for n in arch["nodes"])


def test_cells_blocks_read_earlier_cells_and_blocks() -> None:
    space = create_space("cells", in_channels=3, num_classes=4, image_size=8, cells=3, blocks_per_cell=3)
    names = [layer.name for layer in space.latency_layers()]
    assert "c2b2.from_c2b1" in names and "c2b0.from_c0" in names and "c0b0.from_stem" in names


def test_blocks_whole_block_removed_when_all_operators_off() -> None:
    space = create_space("blocks", in_channels=1, num_classes=10, image_size=8)
    randomise(space, 3, log_odds_mean=3.0)
    from search.spaces.blocks import BlocksTower

    assert isinstance(space, BlocksTower)
    block = space.block_list[0]
    assert block.residual
    with torch.no_grad():
        for j in range(len(block.kernels)):
            gate = block.operator_gate(j)
            assert gate is not None
            gate.log_odds.fill_(-5.0)
    arch = assert_compaction_is_exact(space, torch.randn(2, 1, 8, 8))
    assert not any(node["name"].startswith("s0b0.") for node in arch["nodes"])


def test_architecture_json_round_trip_and_weights_reload() -> None:
    space = create_space("blocks", in_channels=1, num_classes=10, image_size=8)
    randomise(space, 4)
    space.eval()
    network, arch = space.compact()
    rebuilt = from_architecture(json.loads(json.dumps(arch)))
    rebuilt.load_state_dict(network.state_dict())
    rebuilt.eval()
    network.eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), network(x))
    names = [name for name, _ in architecture_ops(arch)]
    assert names[0] == "stem" and names[-1] == "classifier"


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda a: a.update(format="x"), "format"),
        (lambda a: a["nodes"][0].update(cin=7), "nodes[0].cin"),
        (lambda a: a["nodes"][1].update(inputs=["missing"]), "nodes[1].inputs"),
        (lambda a: a["nodes"][0].update(op="deconv"), "nodes[0].op"),
        (lambda a: a.update(output="nowhere"), "output"),
    ],
)
def test_invalid_architecture_errors_name_the_field(mutate: Callable[[dict[str, Any]], None], field: str) -> None:
    space = create_space("blocks", in_channels=1, num_classes=10, image_size=8)
    _, arch = space.compact()
    broken = json.loads(json.dumps(arch))
    mutate(broken)
    with pytest.raises(ArchitectureError) as info:
        validate_architecture(broken)
    assert info.value.field == field


def test_width_multiplier_scales_widths_and_fixed_gates_keep_everything() -> None:
    from search.gates import GateConfig

    half = create_space("blocks", in_channels=1, num_classes=10, image_size=8, width_multiplier=0.5)
    full = create_space("blocks", in_channels=1, num_classes=10, image_size=8)
    assert half.latency_layers()[0].cout * 2 == full.latency_layers()[0].cout
    fixed = create_space("blocks", in_channels=1, num_classes=10, image_size=8, gate=GateConfig(fixed_on=True))
    fixed.train()
    _, arch = fixed.compact()
    assert arch["nodes"][0]["cout"] == fixed.latency_layers()[0].cout


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.down is None else self.down(x)))


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.Sequential(BasicBlock(8, 8, 1), BasicBlock(8, 16, 2), BasicBlock(16, 16, 1))
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


class ConcatNet(nn.Module):
    """Inception-style concat, a depthwise conv over it, a max pool and two linears (biases before BN too)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.b, self.c = nn.Conv2d(6, 5, 1), nn.Conv2d(6, 7, 3, padding=1)
        self.dw, self.bn_dw = nn.Conv2d(12, 12, 3, padding=1, groups=12), nn.BatchNorm2d(12)
        self.pool = nn.MaxPool2d(2)
        self.fc1, self.fc2 = nn.Linear(12, 20), nn.Linear(20, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn_a(self.a(x)))
        y = torch.cat([F.relu(self.b(x)), F.relu(self.c(x))], dim=1)
        y = self.pool(F.relu(self.bn_dw(self.dw(y)))).mean((2, 3))
        return self.fc2(F.relu(self.fc1(y)))


@pytest.mark.parametrize("network", [TinyResNet, ConcatNet])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_from_module_compaction_is_exact(network: type[nn.Module], seed: int) -> None:
    torch.manual_seed(seed)
    original = network()
    space = space_from_module(original, in_channels=1, image_size=8)
    x = torch.randn(3, 1, 8, 8)
    original.eval(), space.eval()
    with torch.no_grad():
        gates_open = space(x)
    # With every gate above one half the gated network computes exactly what the original does.
    torch.testing.assert_close(gates_open, original(x))
    randomise(space, seed)
    arch = assert_compaction_is_exact(space, x)
    rebuilt = from_architecture(json.loads(json.dumps(arch)))
    assert sum(p.numel() for p in rebuilt.parameters()) < sum(p.numel() for p in original.parameters())


def test_from_module_ties_residual_channels_and_finds_layers() -> None:
    space = space_from_module(TinyResNet(), in_channels=1, image_size=8)
    layers = {layer.name: layer for layer in space.latency_layers()}
    assert layers["stem_0"].cin_source is None and layers["fc"].cout_source is None
    # The stem and the first block's second conv add into one stream: one tied group feeds the next block.
    assert layers["stem_0"].cout_source is layers["blocks_0_conv2"].cout_source
    assert layers["blocks_1_conv1"].op.input_shapes()[0][2] == 8
    assert layers["blocks_2_conv1"].op.input_shapes()[0][2] == 4
    assert len(space.gates()) == 8


def test_from_module_refuses_what_it_cannot_gate() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(self.conv(x)) * x

    with pytest.raises(UnsupportedModuleError) as info:
        space_from_module(Odd(), in_channels=1, image_size=8)
    assert info.value.node == "sigmoid"
    assert "from_module" in list_spaces()
    space = create_space("from_module", in_channels=1, num_classes=4, image_size=8, module=ConcatNet())
    assert space(torch.randn(1, 1, 8, 8)).shape == (1, 4)
