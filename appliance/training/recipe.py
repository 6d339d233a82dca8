"""The training recipe: every knob of a training run, validated, and recorded in the model card.

Free of torch, so that the edge install can validate a recipe and document it
(docs/configuration.md).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

NUM_BLOCKS = 16
"""MBConv blocks of the EfficientNet-Lite0 trunk."""


class TrainRecipe(BaseModel):
    """How to train a model from a dataset; the defaults are the tuned ELPV demo recipe.

    ELPV (bench/elpv.py, 2 idle cores): 160 px, blocks 13-15 trained, 10 epochs, class_balance 0.3 →
    0.768 / 0.777 / 0.768 4-level test accuracy with seeds 0 / 1 / 2 (seeds and kernel order move
    results by about 1.5 points), macro-F1 0.550, 185 s; vs frozen 14 / balance 0: 0.761, macro-F1
    0.488, 205 s; frozen 11 / balance 0.5: 0.761, macro-F1 0.543, 1132 s under load; brightness gains
    0.8/1.25: 0.785, 0.784, 0.768 in three runs (not a clear gain, 35-70 s more, so off by default).
    method pooled_features at 300 px (configs/recipes/elpv-pooled-300.yaml): 0.785 / 0.805 / 0.767,
    118-158 s, but 2.6× the latency, so not the default.
    """

    model_config = ConfigDict(extra="forbid")

    method: Literal["fine_tune_top", "pooled_features"] = Field(
        default="fine_tune_top",
        description="fine_tune_top: the blocks above frozen_blocks and the heads are trained on the cached "
                    "maps.  pooled_features: the whole ImageNet network stays frozen; the maps of "
                    "pooled_blocks and of the head conv are pooled (mean, max, deviation) into one vector "
                    "per image, and an MLP of hidden_units is trained on it (frozen_blocks and "
                    "drop_connect do not apply).  ELPV: see configs/recipes/elpv-pooled-300.yaml.",
    )
    pooled_blocks: list[Annotated[int, Field(ge=0, lt=NUM_BLOCKS)]] = Field(
        default=[5, 10, 13], max_length=NUM_BLOCKS,
        description="pooled_features: the MBConv blocks (0-based) whose output maps are pooled beside "
                    "the head conv's; shallow blocks keep thin, small defects.",
    )
    hidden_units: int = Field(
        default=512, ge=0, le=8192,
        description="pooled_features: width of the MLP's hidden layer (0: the heads read the pooled "
                    "vector directly).",
    )
    image_size: int = Field(
        default=160, ge=64, le=512,
        description="Side in px the graph resizes every image to; drives accuracy and latency.",
    )
    frozen_blocks: int = Field(
        default=13, ge=0, le=NUM_BLOCKS,
        description="The stem and this many MBConv blocks keep their ImageNet weights; their output "
                    "is computed once per image and view, and only the blocks above are trained.",
    )
    epochs: int = Field(default=10, ge=1, le=500, description="Maximum passes over the training set.")
    patience: int = Field(
        default=4, ge=1, le=500,
        description="Stop after this many epochs without a better validation score.",
    )
    min_steps: int = Field(
        default=250, ge=1, le=100_000,
        description="Least optimisation steps over all epochs: a small dataset is passed over several "
                    "times per epoch (ELPV's 1,673 training rows already make 260 steps in 10 epochs).",
    )
    batch_size: int = Field(default=64, ge=2, le=1024, description="Samples per optimisation step.")
    lr: float = Field(default=1e-3, gt=0, le=1, description="Peak AdamW learning rate (cosine decay).")
    weight_decay: float = Field(default=1e-4, ge=0, le=1, description="AdamW weight decay.")
    dropout: float = Field(default=0.2, ge=0, lt=1, description="Dropout before the head layers.")
    drop_connect: float = Field(
        default=0.2, ge=0, lt=1,
        description="Stochastic-depth rate of the trained blocks (as in EfficientNet).",
    )
    label_smoothing: float = Field(default=0.0, ge=0, lt=1, description="Cross-entropy label smoothing.")
    ordinal_weight: float = Field(
        default=0.5, ge=0, le=10,
        description="For ordinal heads, weight of the expected grade distance added to the "
                    "cross-entropy, so that a 0-vs-1 mistake costs more than a 0-vs-1/3 one.",
    )
    class_balance: float = Field(
        default=0.3, ge=0, le=1,
        description="Per-class loss weight (1/frequency)^class_balance: 0 = natural frequencies, "
                    "1 = fully balanced classes.",
    )
    flip_horizontal: bool = Field(default=True, description="Add left-right mirrored views.")
    flip_vertical: bool = Field(default=True, description="Add upside-down views.")
    rotate_90: bool = Field(
        default=False,
        description="Add 90° rotated views; only for products whose orientation carries no meaning.",
    )
    brightness_gains: list[Annotated[float, Field(gt=0, le=4)]] = Field(
        default=[], max_length=8,
        description="Add a copy of every view with its pixel values multiplied by each gain (clipped to "
                    "0..255), e.g. [0.8, 1.25]: for lines whose lighting or sensor gain drifts.  Each gain "
                    "costs one more feature-extraction pass per view; the training steps stay the same.",
    )
    inference_flips: bool = Field(
        default=False,
        description="The deployed model also judges the mirror images of every part (the flips enabled "
                    "above) and averages the logits.  ELPV: 4-level accuracy +0.6 / +1.5 points (seeds "
                    "1 / 0), binary +1.1, for 3-3.5× the model's latency (25-28 ms instead of 8).",
    )
    val_fraction: float = Field(
        default=0.15, gt=0, lt=1,
        description="Share of the training rows held out (stratified) for early stopping and "
                    "calibration when the dataset has no 'val' split.",
    )
    seed: int = Field(default=0, ge=0, description="Seed for the split, sampling and initialisation.")
    quantize: bool = Field(
        default=False,
        description="Also build a static int8 model (onnxruntime, calibrated on training images) and "
                    "ship it instead of the fp32 one unless a head's validation accuracy drops more "
                    "than max_quantization_drop; the comparison is recorded in the card.",
    )
    max_quantization_drop: float = Field(
        default=0.01, ge=0, le=1,
        description="Largest validation-accuracy loss (per head, absolute) accepted for int8.",
    )
    quantization_images: int = Field(
        default=64, ge=1, le=10000, description="Training images used to calibrate int8 activations.",
    )

    @field_validator("inference_flips")
    @classmethod
    def _flips_to_average(cls, value: bool, info: ValidationInfo) -> bool:
        if value and not (info.data.get("flip_horizontal") or info.data.get("flip_vertical")):
            raise ValueError("needs flip_horizontal or flip_vertical: the flips averaged are the ones trained on")
        return value
