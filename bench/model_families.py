"""Random members of the CNN families the whole-model predictor must cover, written in plain PyTorch (no torchvision).

Each generator takes a numpy Generator and returns ``(module, resolution, description)``; widths, depths, kernel
sizes and resolutions are drawn per call.  These networks are for validation only: the service never sees them while
it profiles (its in-context networks come from :mod:`latency_service.kernel_generator`, a separate onnx-helper code
path with its own random draws).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

RESOLUTIONS = (32, 64, 96, 128, 160, 192, 224)


def make_divisible(value: float, divisor: int = 8) -> int:
    return max(divisor, int(value + divisor / 2) // divisor * divisor)


def _act(name: str) -> nn.Module:
    return {"relu": nn.ReLU(), "relu6": nn.ReLU6(), "hardswish": nn.Hardswish(), "silu": nn.SiLU()}[name]


def conv_bn(
    cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: str | None = "relu"
) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(_act(act))
    return nn.Sequential(*layers)


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, squeeze: int, act: str = "relu", gate: str = "hardsigmoid") -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(c, squeeze, 1)
        self.act = _act(act)
        self.fc2 = nn.Conv2d(squeeze, c, 1)
        self.gate: nn.Module = nn.Hardsigmoid() if gate == "hardsigmoid" else nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = x.mean((2, 3), keepdim=True)
        return x * self.gate(self.fc2(self.act(self.fc1(scale))))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int, k: int, act: str, se: str | None) -> None:
        super().__init__()
        hidden = make_divisible(cin * expand)
        layers: list[nn.Module] = [conv_bn(cin, hidden, 1, act=act)] if expand != 1 else []
        layers.append(
            conv_bn(
                hidden if expand != 1 else cin,
                hidden if expand != 1 else cin,
                k,
                stride,
                groups=hidden if expand != 1 else cin,
                act=act,
            )
        )
        width = hidden if expand != 1 else cin
        if se is not None:
            layers.append(
                SqueezeExcite(width, make_divisible(width / 4), "relu" if se == "hardsigmoid" else "silu", se)
            )
        layers.append(conv_bn(width, cout, 1, act=None))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.residual else y


def _head(c: int, classes: int, hidden: int | None = None, act: str = "relu") -> nn.Sequential:
    layers: list[nn.Module] = [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if hidden:
        layers += [nn.Linear(c, hidden), _act(act), nn.Dropout(0.2)]
    layers.append(nn.Linear(hidden or c, classes))
    return nn.Sequential(*layers)


def mobilenet(
    rng: np.random.Generator, *, v3: bool = False, mnasnet: bool = False, efficient: bool = False
) -> nn.Module:
    width = float(rng.choice([0.35, 0.5, 0.75, 1.0]))
    stages = [(16, 1, 1, 3), (24, 2, 2, 3), (40, 2, 3, 5), (80, 2, 3, 3), (112, 1, 2, 5), (160, 2, 2, 5)]
    stem = make_divisible(16 * width if v3 else 32 * width)
    act = "hardswish" if v3 else ("silu" if efficient else "relu6")
    layers: list[nn.Module] = [conv_bn(3, stem, 3, 2, act=act)]
    cin = stem
    for i, (c, stride, depth, k) in enumerate(stages[: int(rng.integers(4, 7))]):
        cout = make_divisible(c * width)
        for d in range(max(1, depth + int(rng.integers(-1, 2)))):
            expand = 1 if i == 0 else int(rng.choice([3, 4, 6]))
            kernel = int(rng.choice([3, 5, 7])) if (mnasnet or efficient) else (k if v3 else 3)
            se = ("hardsigmoid" if v3 else "sigmoid") if (v3 or efficient) and rng.random() < 0.6 else None
            layers.append(
                InvertedResidual(
                    cin, cout, stride if d == 0 else 1, expand, kernel, act if (i > 1 or not v3) else "relu", se
                )
            )
            cin = cout
    last = make_divisible(cin * 6)
    layers.append(conv_bn(cin, last, 1, act=act))
    layers.append(_head(last, int(rng.integers(10, 1001)), hidden=1024 if v3 else None, act=act))
    return nn.Sequential(*layers)


class ShuffleUnit(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        branch = cout // 2
        if stride > 1:
            self.left = nn.Sequential(conv_bn(cin, cin, 3, stride, groups=cin, act=None), conv_bn(cin, branch, 1))
        right_in = cin if stride > 1 else cin // 2
        self.right = nn.Sequential(
            conv_bn(right_in, branch, 1),
            conv_bn(branch, branch, 3, stride, groups=branch, act=None),
            conv_bn(branch, branch, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            left, right = x.chunk(2, dim=1)
            out = torch.cat([left, self.right(right)], dim=1)
        else:
            out = torch.cat([self.left(x), self.right(x)], dim=1)
        b, c, h, w = out.shape
        return out.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)


def shufflenet(rng: np.random.Generator) -> nn.Module:
    widths = {0.5: (48, 96, 192), 1.0: (116, 232, 464), 1.5: (176, 352, 704)}[float(rng.choice([0.5, 1.0, 1.5]))]
    layers: list[nn.Module] = [conv_bn(3, 24, 3, 2), nn.MaxPool2d(3, 2, 1)]
    cin = 24
    for c, depth in zip(
        widths, (int(rng.integers(2, 5)), int(rng.integers(3, 8)), int(rng.integers(2, 5))), strict=True
    ):
        for d in range(depth):
            layers.append(ShuffleUnit(cin, c, 2 if d == 0 else 1))
            cin = c
    layers += [conv_bn(cin, 1024, 1), _head(1024, int(rng.integers(10, 1001)))]
    return nn.Sequential(*layers)


class ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, bottleneck: bool, groups: int = 1, width: int = 0) -> None:
        super().__init__()
        if bottleneck:
            mid = width or cout // 4
            self.body = nn.Sequential(
                conv_bn(cin, mid, 1), conv_bn(mid, mid, 3, stride, groups=groups), conv_bn(mid, cout, 1, act=None)
            )
        else:
            self.body = nn.Sequential(conv_bn(cin, cout, 3, stride), conv_bn(cout, cout, 3, act=None))
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else conv_bn(cin, cout, 1, stride, act=None)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


def resnet(rng: np.random.Generator, *, bottleneck: bool) -> nn.Module:
    base = int(rng.choice([16, 24, 32, 48, 64]))
    layers: list[nn.Module] = [conv_bn(3, base, 7, 2), nn.MaxPool2d(3, 2, 1)]
    cin = base
    for i in range(int(rng.integers(3, 5))):
        cout = base * 2**i * (4 if bottleneck else 1)
        for d in range(int(rng.integers(1, 4))):
            layers.append(ResidualBlock(cin, cout, 2 if (d == 0 and i > 0) else 1, bottleneck))
            cin = cout
    layers.append(_head(cin, int(rng.integers(10, 1001))))
    return nn.Sequential(*layers)


def regnet(rng: np.random.Generator) -> nn.Module:
    group_width = int(rng.choice([8, 16, 24, 32]))
    widths = [make_divisible(w, group_width) for w in np.geomspace(group_width * 2, group_width * 16, 4)]
    layers: list[nn.Module] = [conv_bn(3, 32, 3, 2)]
    cin = 32
    for w in widths:
        for d in range(int(rng.integers(1, 4))):
            layers.append(ResidualBlock(cin, w, 2 if d == 0 else 1, True, groups=w // group_width, width=w))
            cin = w
    layers.append(_head(cin, int(rng.integers(10, 1001))))
    return nn.Sequential(*layers)


class Fire(nn.Module):
    def __init__(self, cin: int, squeeze: int, expand: int) -> None:
        super().__init__()
        self.squeeze = nn.Sequential(nn.Conv2d(cin, squeeze, 1), nn.ReLU())
        self.e1 = nn.Sequential(nn.Conv2d(squeeze, expand, 1), nn.ReLU())
        self.e3 = nn.Sequential(nn.Conv2d(squeeze, expand, 3, padding=1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.squeeze(x)
        return torch.cat([self.e1(s), self.e3(s)], 1)


class InceptionBlock(nn.Module):
    def __init__(self, cin: int, c: int) -> None:
        super().__init__()
        self.b1 = conv_bn(cin, c, 1)
        self.b3 = nn.Sequential(conv_bn(cin, c // 2, 1), conv_bn(c // 2, c, 3))
        self.b5 = nn.Sequential(conv_bn(cin, c // 4, 1), conv_bn(c // 4, c // 2, 5))
        self.bp = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_bn(cin, c // 2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b3(x), self.b5(x), self.bp(x)], 1)


def squeezenet(rng: np.random.Generator) -> nn.Module:
    base = int(rng.choice([8, 16, 24]))
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 3, 2), nn.ReLU(), nn.MaxPool2d(3, 2, ceil_mode=True)]
    cin = 64
    for i in range(int(rng.integers(3, 6))):
        layers.append(Fire(cin, base * (i // 2 + 1), base * 4 * (i // 2 + 1)))
        cin = base * 8 * (i // 2 + 1)
        if i % 2 == 1:
            layers.append(nn.MaxPool2d(3, 2, ceil_mode=True))
    layers += [nn.Conv2d(cin, int(rng.integers(10, 1001)), 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers)


def inception(rng: np.random.Generator) -> nn.Module:
    c = int(rng.choice([16, 24, 32, 48]))
    layers: list[nn.Module] = [conv_bn(3, 32, 3, 2), conv_bn(32, 64, 3), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for i in range(int(rng.integers(2, 5))):
        layers.append(InceptionBlock(cin, c * (i + 1)))
        cin = c * (i + 1) * 3
        if i % 2 == 1:
            layers.append(nn.MaxPool2d(3, 2, 1))
    layers.append(_head(cin, int(rng.integers(10, 1001))))
    return nn.Sequential(*layers)


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin),
            nn.ReLU(),
            nn.Conv2d(cin, 4 * growth, 1, bias=False),
            nn.BatchNorm2d(4 * growth),
            nn.ReLU(),
            nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.body(x)], 1)


def densenet(rng: np.random.Generator) -> nn.Module:
    growth = int(rng.choice([12, 16, 24, 32]))
    cin = 2 * growth
    layers: list[nn.Module] = [conv_bn(3, cin, 3, 2), nn.MaxPool2d(3, 2, 1)]
    for block in range(int(rng.integers(2, 4))):
        for _ in range(int(rng.integers(2, 7))):
            layers.append(DenseLayer(cin, growth))
            cin += growth
        if block < 2:
            layers += [nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, cin // 2, 1, bias=False), nn.AvgPool2d(2, 2)]
            cin //= 2
    layers += [nn.BatchNorm2d(cin), nn.ReLU(), _head(cin, int(rng.integers(10, 1001)))]
    return nn.Sequential(*layers)


def vgg(rng: np.random.Generator, resolution: int) -> nn.Module:
    base = int(rng.choice([16, 32, 48, 64]))
    layers: list[nn.Module] = []
    cin, _hw = 3, resolution
    alexnet = rng.random() < 0.3
    if alexnet:
        layers += [
            nn.Conv2d(3, base, 11 if resolution >= 128 else 5, 4 if resolution >= 128 else 2, 2),
            nn.ReLU(),
            nn.MaxPool2d(3, 2),
        ]
        cin = base
    with torch.no_grad():
        hw = nn.Sequential(*layers)(torch.zeros(1, 3, resolution, resolution)).shape[-1] if layers else resolution
    for i in range(int(rng.integers(3, 6))):
        if hw < 4:
            break
        cout = min(base * 2**i, 512)
        for _ in range(int(rng.integers(1, 3))):
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU()]
            cin = cout
        layers.append(nn.MaxPool2d(2, 2))
        hw //= 2
    with torch.no_grad():
        final_hw = nn.Sequential(*layers)(torch.zeros(1, 3, resolution, resolution)).shape[-1]
    # The TorchScript exporter only takes adaptive pools whose output size divides the input.
    pooled = 2 if final_hw % 2 == 0 else 1
    hidden = int(rng.choice([512, 1024, 2048]))
    layers += [
        nn.AdaptiveAvgPool2d(pooled),
        nn.Flatten(),
        nn.Linear(cin * pooled * pooled, hidden),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, int(rng.integers(10, 1001))),
    ]
    return nn.Sequential(*layers)


FAMILY_BUILDERS: dict[str, Callable[[np.random.Generator, int], nn.Module]] = {
    "mobilenet_v2": lambda rng, r: mobilenet(rng),
    "mobilenet_v3": lambda rng, r: mobilenet(rng, v3=True),
    "mnasnet": lambda rng, r: mobilenet(rng, mnasnet=True),
    "efficientnet": lambda rng, r: mobilenet(rng, efficient=True),
    "shufflenet_v2": lambda rng, r: shufflenet(rng),
    "resnet_basic": lambda rng, r: resnet(rng, bottleneck=False),
    "resnet_bottleneck": lambda rng, r: resnet(rng, bottleneck=True),
    "regnet": lambda rng, r: regnet(rng),
    "squeezenet": lambda rng, r: squeezenet(rng),
    "inception": lambda rng, r: inception(rng),
    "densenet": lambda rng, r: densenet(rng),
    "vgg": vgg,
}
FAMILIES: tuple[str, ...] = tuple(FAMILY_BUILDERS)


def random_member(family: str, rng: np.random.Generator, resolution: int | None = None) -> tuple[nn.Module, int]:
    """A random, initialised, eval-mode member of ``family`` and the input resolution it is meant for."""
    res = int(resolution or rng.choice(RESOLUTIONS))
    torch.manual_seed(int(rng.integers(1 << 31)))
    model = FAMILY_BUILDERS[family](rng, res).eval()
    # Non-trivial BN statistics so that the exported graph carries real (not identity) normalisations.
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d) and module.running_var is not None and module.running_mean is not None:
            module.running_var.uniform_(0.5, 1.5)
            module.running_mean.normal_(0, 0.1)
    return model, res


def export_onnx(model: nn.Module, resolution: int, *, dynamo: bool) -> bytes:
    """Export with either torch.onnx.export path: TorchScript (opset 17) or the default dynamo one."""
    import io
    import logging
    import warnings

    # The dynamo exporter logs one warning per missing torchvision op; none of these models uses them.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)

    x = torch.randn(1, 3, resolution, resolution)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
            assert program is not None
            return bytes(program.model_proto.SerializeToString())
        buffer = io.BytesIO()
        torch.onnx.export(model, (x,), buffer, dynamo=False, opset_version=17)  # type: ignore[arg-type]
        return buffer.getvalue()
