"""In-graph preprocessing: raw uint8 camera images in, normalised network input out.

The same module runs in training (to compute the cached trunk features) and inside the exported
ONNX graph, so the appliance and training can never disagree about resizing or normalisation.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from appliance.training.backbone import INPUT_MEAN, INPUT_STD


class Preprocess(nn.Module):
    """uint8 ``N×H×W`` ("NHW", mono) or ``N×H×W×C`` ("NHWC", C = 3) of any H, W
    → float ``N×3×size×size``: bilinear resize, the backbone's normalisation, mono replicated to RGB."""

    scale: torch.Tensor
    shift: torch.Tensor

    def __init__(self, layout: Literal["NHW", "NHWC"], size: int) -> None:
        super().__init__()
        self.layout = layout
        self.size = size
        # (x - mean)/std == x*scale + shift
        self.register_buffer("scale", torch.full((1, 3, 1, 1), 1.0 / INPUT_STD), persistent=False)
        self.register_buffer("shift", torch.full((1, 3, 1, 1), -INPUT_MEAN / INPUT_STD), persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.float()
        x = x.unsqueeze(1) if self.layout == "NHW" else x.permute(0, 3, 1, 2)
        # Resize before the channel expansion: a mono image is resized once, not three times.
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return x * self.scale + self.shift
