"""Small architectures shared by the tests, each built from a seed, and their maps."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def plain_cnn(seed: int = 0, channels: int = 1, classes: int = 5) -> nn.Module:
    """Conv-ReLU-MaxPool twice, then two dense layers."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(channels, 6, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 16),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(16, classes),
    ).eval()


class ResidualNet(nn.Module):
    """BatchNorm, F.relu in forward, a residual block and average pooling."""

    def __init__(self, channels: int = 1, classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.pool = nn.AvgPool2d(2)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.bn1(self.conv1(x)))
        b = torch.relu(self.bn2(self.conv2(a)))
        return self.head(self.pool(a + b).relu())


def residual_net(seed: int = 0, channels: int = 1, classes: int = 5) -> nn.Module:
    """A :class:`ResidualNet` with non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    net = ResidualNet(channels, classes)
    for bn in (net.bn1, net.bn2):
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 1.5)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
    return net.eval()


def vgg_small(seed: int = 0, channels: int = 1, classes: int = 5, bias: bool = True) -> nn.Module:
    """VGG-style: conv blocks with max-pool, then a dense head."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(channels, 8, 3, padding=1, bias=bias),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=bias),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1, bias=bias),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 32, bias=bias),
        nn.ReLU(),
        nn.Linear(32, classes, bias=bias),
    ).eval()


# The two architectures on which every method is checked against Captum, and a
# target per item of a batch of 4.
CAPTUM_NETS = {"plain_cnn": plain_cnn, "residual_net": residual_net}
TARGET = torch.tensor([0, 3, 1, 4])


class FlushSpy(nn.Module):
    """Records at every forward whether subnormal floats count as zero."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.seen: list[bool] = []

    def forward(self, x):
        self.seen.append(float(torch.tensor([1e-39]) * 1.0) == 0.0)
        return self.net(x)


class PatchAttention(nn.Module):
    """Patches, one self-attention layer and a ReLU head, as a small ViT: attention by
    ``F.scaled_dot_product_attention`` (fused kernels on CPU and GPU), or written out
    by hand with ``by_hand``."""

    def __init__(self, seed: int = 0, channels: int = 1, classes: int = 5, by_hand: bool = False):
        super().__init__()
        torch.manual_seed(seed)
        self.patch = nn.Conv2d(channels, 8, 4, stride=4)
        self.qkv = nn.Linear(8, 24)
        self.head = nn.Linear(8, classes)
        self.by_hand = by_hand

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        q, k, v = (t.unsqueeze(1) for t in self.qkv(tokens).chunk(3, dim=-1))
        if self.by_hand:
            weights = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1)
            mixed = weights @ v
        else:
            mixed = F.scaled_dot_product_attention(q, k, v)
        return self.head(F.relu(tokens + mixed.squeeze(1)).mean(1))


class SqueezeExcite(nn.Module):
    """A ReLU network with MobileNetV3's squeeze-excitation gate, ``nn.Hardsigmoid`` (whose
    torch backward has no derivative), or the same gate written out as ``relu6(z + 3) / 6``
    with ``by_hand``."""

    def __init__(self, seed: int = 0, classes: int = 5, by_hand: bool = False):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.squeeze, self.excite = nn.Linear(8, 4), nn.Linear(4, 8)
        self.gate = nn.Hardsigmoid(inplace=True)
        self.head = nn.Linear(8 * 8 * 8, classes)
        self.by_hand = by_hand

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv(x))
        z = self.excite(F.relu(self.squeeze(h.mean((2, 3)))))
        gate = F.relu6(z + 3) / 6 if self.by_hand else self.gate(z)
        return self.head(F.max_pool2d(h * gate[..., None, None], 2).flatten(1))


def maps_of(model: nn.Module, x: torch.Tensor, method: str = "gradient", **options) -> torch.Tensor:
    """The heatmaps ``(B, H, W)`` of ``method`` on ``x``."""
    import betasmooth as bs

    return bs.heatmap(bs.explain(model, x, method, **options))


def targets_of(model: nn.Module, x: torch.Tensor, method: str = "gradient", **options):
    """Each image's target: the map of another image of the batch (seed 1)."""
    from betasmooth.attack import random_targets

    maps = maps_of(model, x, method, **options)
    return random_targets(maps, torch.Generator().manual_seed(1))


def relu_replaced(net: nn.Sequential, make) -> nn.Sequential:
    """A copy of ``net`` with each of its ReLU layers replaced by ``make()``."""
    import copy

    out = copy.deepcopy(net)
    for i, layer in enumerate(out):
        if isinstance(layer, nn.ReLU):
            out[i] = make()
    return out
