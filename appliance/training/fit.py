"""The optimisation loop on cached trunk features, with early stopping on the validation part."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from appliance.dataset import HeadSpec
from appliance.training.losses import class_weights, head_loss
from appliance.training.metrics import softmax
from appliance.training.network import TrainNet
from appliance.training.progress import Progress, progress_bar
from appliance.training.recipe import TrainRecipe
from appliance.training.within import cells, graded, mixture_np, training_logits

EVAL_BATCH = 256
CHANNELS_LAST = torch.channels_last
"""Memory format for the top blocks while training: oneDNN's depthwise-conv backward is about
2.5× faster in it on a small CPU (a whole step about 1.2×)."""


def _batch(features: np.ndarray) -> torch.Tensor:
    """Cached float16 features as a float32 tensor (maps in ``CHANNELS_LAST``; pooled vectors as they are)."""
    x = torch.from_numpy(features.astype(np.float32))
    return x.contiguous(memory_format=CHANNELS_LAST) if x.dim() == 4 else x


@dataclass(slots=True)
class FitResult:
    best_epoch: int
    epochs_run: int
    steps: int = 0
    """Optimisation steps taken."""
    history: list[dict] = field(default_factory=list)


def logits_of(net: TrainNet, features: np.ndarray) -> list[np.ndarray]:
    """Per-head logits for ``V×N×C×h×w`` float16 features (V views of N images), in eval mode,
    averaged over the views as the deployed graph averages them."""
    net.eval()
    parts: list[list[np.ndarray]] = [[] for _ in net.heads]
    with torch.no_grad():
        for view in features:
            for start in range(0, len(view), EVAL_BATCH):
                for j, z in enumerate(net(_batch(view[start:start + EVAL_BATCH]))):
                    parts[j].append(z.numpy())
    return [np.concatenate(p).reshape(len(features), -1, p[0].shape[1]).mean(axis=0) for p in parts]


def _score(logits: list[np.ndarray], y: np.ndarray, links: list[tuple[int, int]]) -> tuple[float, float]:
    """(mean accuracy over heads, mean NLL over heads) on the labelled rows; a graded head (in
    ``links``) is scored by its mixture, as the deployed graph outputs it."""
    accs, nlls = [], []
    conditioning = dict(links)
    for j, z in enumerate(logits):
        if j in conditioning:
            c = conditioning[j]
            z = np.log(np.clip(mixture_np(softmax(logits[c]), z, 1.0), 1e-12, None))
        known = y[:, j] >= 0
        zk, yk = torch.from_numpy(z[known]), torch.from_numpy(y[known, j])
        accs.append(float((zk.argmax(1) == yk).float().mean()))
        nlls.append(float(torch.nn.functional.cross_entropy(zk, yk)))
    return float(np.mean(accs)), float(np.mean(nlls))


def _loss_weights(heads: list[HeadSpec], y: np.ndarray,
                  balance: float) -> tuple[list[torch.Tensor], dict[int, torch.Tensor]]:
    """Per head, its class weights; for a graded head, weights per (conditioning class, class)
    cell instead, with each training row's cell (``{head index: cells}``)."""
    weights, cell_of = [], {}
    conditioning = dict(graded(heads))
    for j, h in enumerate(heads):
        if j in conditioning:
            k = len(heads[conditioning[j]].classes)
            group = cells(y[:, j], y[:, conditioning[j]], len(h.classes), k)
            weights.append(class_weights(group, len(h.classes) * (k + 1), balance))
            cell_of[j] = torch.from_numpy(group)
        else:
            weights.append(class_weights(y[:, j], len(h.classes), balance))
    return weights, cell_of


def fit(net: TrainNet, heads: list[HeadSpec], train_x: np.ndarray, y_train: np.ndarray,
        val_x: np.ndarray, y_val: np.ndarray, recipe: TrainRecipe, progress: Progress) -> FitResult:
    """Train ``net`` in place on ``train_x`` (``V×N×…``: each step draws a random view per sample);
    leaves the weights of the epoch with the best validation accuracy (ties: lower NLL) on
    ``val_x`` (``V×N×…``: the views the deployed graph averages)."""
    rng = np.random.default_rng(recipe.seed)
    n_views, n = train_x.shape[:2]
    batch = min(recipe.batch_size, n)
    # The ragged tail is dropped (a permutation per epoch covers it over time).  A small dataset is
    # passed over several times per epoch, so that a run with 25 images per class gets as many
    # optimisation steps as one with thousands (10 steps of 64 would leave the top untrained).
    steps = max(n // batch, math.ceil(recipe.min_steps / recipe.epochs))
    total = steps * recipe.epochs
    links = graded(heads)
    conditioning = dict(links)
    weights, cell_of = _loss_weights(heads, y_train, recipe.class_balance)
    optimiser = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad],
                                  lr=recipe.lr, weight_decay=recipe.weight_decay)
    warmup = max(1, total // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s / total, 1.0)))
    )
    targets = torch.from_numpy(y_train)
    best: tuple[float, float] = (-1.0, math.inf)
    best_state = copy.deepcopy(net.state_dict())
    result = FitResult(best_epoch=0, epochs_run=0)
    bar = progress_bar(total, "train", "step", progress)
    net.to(memory_format=CHANNELS_LAST)  # type: ignore[call-overload]  # (torch stubs omit memory_format)
    try:
        for epoch in range(1, recipe.epochs + 1):
            net.train()
            order = np.concatenate([rng.permutation(n) for _ in range(math.ceil(steps * batch / n))])
            running = 0.0
            for s in range(steps):
                idx = np.sort(order[s * batch:(s + 1) * batch])
                view = rng.integers(0, n_views, size=len(idx))
                logits = net(_batch(train_x[view, idx]))
                loss: torch.Tensor = sum(  # type: ignore[assignment]
                    head_loss(training_logits(z, logits[conditioning[j]], targets[idx, conditioning[j]])
                              if j in conditioning else z,
                              targets[idx, j], weights[j], heads[j].ordinal, recipe.ordinal_weight,
                              recipe.label_smoothing, cell_of[j][idx] if j in cell_of else None)
                    for j, z in enumerate(logits)
                )
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                schedule.step()
                running += float(loss.detach())
                bar.update(1)
            acc, nll = _score(logits_of(net, val_x), y_val, links)
            result.history.append({"epoch": epoch, "train_loss": round(running / max(steps, 1), 4),
                                   "val_accuracy": round(acc, 4), "val_nll": round(nll, 4)})
            result.epochs_run = epoch
            bar.set_postfix({"epoch": epoch, "val acc (mean of heads)": f"{acc:.3f}"})
            if (acc, -nll) > (best[0], -best[1]):
                best, result.best_epoch = (acc, nll), epoch
                best_state = copy.deepcopy(net.state_dict())
            elif epoch - result.best_epoch >= recipe.patience:
                break
    finally:
        bar.close()
        # The exporter and callers expect the default format.
        net.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    result.steps = steps * result.epochs_run  # every epoch runs all its steps
    net.load_state_dict(best_state)
    return result
