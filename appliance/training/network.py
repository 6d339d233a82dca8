"""The multi-head classifier: frozen trunk, trained top, one linear layer per head.

The trained top is either the last MBConv blocks (``build``: fine-tuned on cached maps) or a small
MLP on the whole frozen network's pooled multi-level features (``build_pooled``).

``TrainNet`` is what the optimiser sees (cached trunk features in, logits out); ``ExportNet`` is
the whole graph that goes into model.onnx (raw uint8 image in, calibrated probabilities out).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import nn

from appliance.training.backbone import ARCHITECTURE, FEATURES, PooledTrunk, Top, Trunk, load_backbone
from appliance.training.preprocess import Preprocess
from appliance.training.within import mixture


class TrainNet(nn.Module):
    """Cached trunk features → one logit vector per head (``top`` yields ``width`` features)."""

    def __init__(self, top: nn.Module, classes_per_head: list[int], dropout: float, width: int = FEATURES) -> None:
        super().__init__()
        self.top = top
        self.dropout = nn.Dropout(dropout)
        self.heads = nn.ModuleList(nn.Linear(width, n) for n in classes_per_head)

    def forward(self, features: torch.Tensor) -> list[torch.Tensor]:
        x = self.dropout(self.top(features))
        return [head(x) for head in self.heads]


class Standardize(nn.Module):
    """``(x - mean) / std`` per feature, with the statistics of the training features frozen in."""

    mean: torch.Tensor
    inv_std: torch.Tensor

    def __init__(self, features: np.ndarray) -> None:
        super().__init__()
        flat = features.reshape(-1, features.shape[-1])
        mean = np.zeros(flat.shape[1])
        square = np.zeros(flat.shape[1])
        for start in range(0, len(flat), 4096):  # float64 sums over float16 chunks
            chunk = flat[start:start + 4096].astype(np.float64)
            mean += chunk.sum(axis=0)
            square += (chunk ** 2).sum(axis=0)
        mean /= len(flat)
        std = np.sqrt(np.maximum(square / len(flat) - mean ** 2, 0.0))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        # A feature constant over the training rows carries nothing to learn; zeroed rather than
        # divided by ~0, so that another value on the line cannot blow the input up.
        inv_std = np.where(std > 1e-6, 1.0 / np.maximum(std, 1e-6), 0.0)
        self.register_buffer("inv_std", torch.tensor(inv_std, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) * self.inv_std


def pooled_top(features: np.ndarray, hidden_units: int, dropout: float) -> tuple[nn.Module, int]:
    """The trained part for pooled features (``V×N×D``, cached): standardise, dropout, one hidden
    GELU layer of ``hidden_units`` (none when 0); returns it and its output width."""
    layers: list[nn.Module] = [Standardize(features)]
    if hidden_units:
        layers += [nn.Dropout(dropout), nn.Linear(features.shape[-1], hidden_units), nn.GELU()]
    return nn.Sequential(*layers), hidden_units or features.shape[-1]


class FrozenPart(nn.Module):
    """Preprocessing + frozen trunk: raw uint8 images → the features ``TrainNet`` consumes."""

    def __init__(self, preprocess: Preprocess, trunk: Trunk | PooledTrunk) -> None:
        super().__init__()
        self.preprocess = preprocess
        self.trunk = trunk

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.trunk(self.preprocess(image))


def hierarchy(heads: list) -> list[tuple[int, int, torch.Tensor]]:
    """``(child index, parent index, allowed)`` per hierarchical head: ``allowed[p, c]`` = 1 when
    child class c belongs to parent class p.  A child class missing from ``parent_of`` is allowed
    under every parent."""
    names = [h.name for h in heads]
    out = []
    for i, h in enumerate(heads):
        if not h.parent or h.parent not in names:
            continue
        j = names.index(h.parent)
        parent = heads[j]
        allowed = torch.zeros(len(parent.classes), len(h.classes))
        for c, name in enumerate(h.classes):
            p = h.parent_of.get(name)
            if p in parent.classes:
                allowed[parent.classes.index(p), c] = 1.0
            else:
                allowed[:, c] = 1.0
        out.append((i, j, allowed))
    return out


def flipped(x: torch.Tensor, horizontal: bool, vertical: bool) -> torch.Tensor:
    """``x`` (``N×C×H×W``) mirrored left-right and/or upside down."""
    dims = [d for d, on in ((3, horizontal), (2, vertical)) if on]
    return torch.flip(x, dims) if dims else x


class ExportNet(nn.Module):
    """The deployed graph: uint8 image → per-head softmax(logits / temperature + prior shift).

    Unless ``flips`` (``(horizontal, vertical)`` pairs) is the identity alone, every image is judged
    in each of those mirror images as one batch and the logits are averaged.

    The prior shift (zero unless the head has ``line_frequencies``) moves the calibrated
    probabilities from the training set's class mix to the line's.

    A hierarchical (child) head is made consistent with its parent in the graph: its
    probabilities are restricted to the classes of the predicted parent class and renormalised
    (a child whose parent class has no child classes keeps its unrestricted output).

    A head graded within another (``graded``: ``(head, conditioning head)`` pairs) outputs the
    mixture of its sub-heads (each ``softmax(logits / temperature)``, one temperature shared by
    the sub-heads) weighted by the conditioning head's final probabilities.
    """

    inv_temperature: torch.Tensor

    def __init__(self, frozen: FrozenPart, net: TrainNet, temperatures: list[float], shifts: list[list[float]],
                 links: list[tuple[int, int, torch.Tensor]] | None = None,
                 flips: Sequence[tuple[bool, bool]] = ((False, False),),
                 graded: list[tuple[int, int]] | None = None) -> None:
        super().__init__()
        self.frozen = frozen
        self.net = net
        self.flips = list(flips)
        self.register_buffer("inv_temperature", 1.0 / torch.tensor(temperatures, dtype=torch.float32))
        self.shifts = nn.ParameterList(
            nn.Parameter(torch.tensor(shift, dtype=torch.float32), requires_grad=False)
            for shift in shifts
        )
        self.links = [(i, j) for i, j, _ in links or []]
        self.graded = list(graded or [])
        for k, (_, _, allowed) in enumerate(links or []):
            self.register_buffer(f"allowed_{k}", allowed)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.flips == [(False, False)]:
            logits = self.net(self.frozen(image))
        else:
            x = self.frozen.preprocess(image)
            views = self.net(self.frozen.trunk(torch.cat([flipped(x, h, v) for h, v in self.flips])))
            logits = [z.reshape(len(self.flips), -1, z.shape[1]).mean(dim=0) for z in views]
        mixed = {j for j, _ in self.graded}
        probs = [z if i in mixed else torch.softmax(z * self.inv_temperature[i] + self.shifts[i], dim=1)
                 for i, z in enumerate(logits)]
        for k, (child, parent) in enumerate(self.links):
            allowed: torch.Tensor = getattr(self, f"allowed_{k}")
            top = probs[parent] >= probs[parent].max(dim=1, keepdim=True).values
            chosen = (top.float() / top.float().sum(dim=1, keepdim=True)) @ allowed  # N×child
            mask = (chosen > 0).float()
            masked = probs[child] * mask
            total = masked.sum(dim=1, keepdim=True)
            probs[child] = torch.where(total > 0, masked / total.clamp_min(1e-12), probs[child])
        for j, c in self.graded:  # after the masks: the conditioning head's final probabilities
            probs[j] = mixture(probs[c], logits[j], self.inv_temperature[j])
        return tuple(probs)


def build(layout: Literal["NHW", "NHWC"], image_size: int, frozen_blocks: int, classes_per_head: list[int],
          dropout: float, drop_connect: float) -> tuple[FrozenPart, TrainNet]:
    """The two halves of a fresh pretrained model; they share no parameters."""
    backbone = load_backbone(image_size)
    frozen = FrozenPart(Preprocess(layout, image_size), Trunk(backbone, frozen_blocks)).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    net = TrainNet(Top(backbone, frozen_blocks, drop_connect), classes_per_head, dropout)
    return frozen, net


def build_pooled(layout: Literal["NHW", "NHWC"], image_size: int, taps: list[int],
                 architecture: str = ARCHITECTURE) -> FrozenPart:
    """The whole pretrained network, frozen, as a pooled multi-level feature extractor (the trained
    part comes from ``pooled_top`` once its features are cached)."""
    trunk = PooledTrunk(load_backbone(image_size, architecture), taps)
    frozen = FrozenPart(Preprocess(layout, image_size), trunk).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    return frozen
