"""In-graph preprocessing: raw uint8 camera images in, normalised network input out.

The same module runs in training (to compute the cached trunk features) and inside the exported
ONNX graph, so the appliance and training can never disagree about resizing or normalisation.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Preprocess(nn.Module):
    """uint8 ``N×H×W`` ("NHW", mono) or ``N×H×W×C`` ("NHWC", C = 3) of any H, W
    → float ``N×3×size×size``: bilinear resize, ImageNet normalisation, mono replicated to RGB."""

    scale: torch.Tensor
    shift: torch.Tensor

    def __init__(self, layout: Literal["NHW", "NHWC"], size: int) -> None:
        super().__init__()
        self.layout = layout
        self.size = size
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        # (x/255 - mean)/std == x*scale + shift
        self.register_buffer("scale", 1.0 / (255.0 * std), persistent=False)
        self.register_buffer("shift", -mean / std, persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.float()
        x = x.unsqueeze(1) if self.layout == "NHW" else x.permute(0, 3, 1, 2)
        # Resize before the channel expansion: a mono image is resized once, not three times.
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return x * self.scale + self.shift
