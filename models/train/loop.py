"""One training loop for every network: seeded batches, running loss, early stopping on
validation only, best weights restored."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from models.nn import build_optimizers, split_parameters

Batch = dict[str, torch.Tensor]
StepLoss = Callable[[torch.nn.Module, Batch], torch.Tensor]


class BatchSource(Protocol):
    """Anything that gathers a batch of encoded rows (models.data.dataset.EncodedLog)."""

    def batch(self, idx: np.ndarray) -> dict[str, np.ndarray]: ...


class Progress(Protocol):
    def start(self, name: str, total: int) -> None: ...
    def advance(self, loss: float) -> None: ...
    def finish(self, summary: str) -> None: ...


@dataclass
class FitConfig:
    """Loop settings. The defaults train to convergence with no flags, from a 100k-row log
    (many passes, validated every epoch) to the 21M-row `large` one (a step budget, validated
    within the epoch): training is budgeted in optimiser steps as well as epochs, the rate
    warms up and then decays on a cosine, and early stopping keeps the best validation point.
    """

    # Upper bounds; whichever comes first ends training. Early stopping usually does.
    epochs: int = 30
    max_steps: int | None = 3_000
    batch_size: int = 2048
    lr: float = 2e-3
    # Adam-style steps move every touched row by ~lr whatever its gradient, so a rare ad's
    # embedding is jolted by each of its few impressions: keep the sparse rate as low as dense.
    sparse_lr: float = 2e-3
    # "adam" (SparseAdam) or "adagrad": per-row accumulators, so a rare id's step stays
    # proportional to its small gradient instead of a full lr-sized jolt.
    sparse_optimizer: str = "adam"
    adagrad_init: float = 0.1
    # Validations without improvement before stopping; validation runs every epoch, or every
    # `1 / validations` of the step budget when an epoch is longer than that.
    patience: int = 2
    validations: int = 20
    valid_max_rows: int | None = 100_000  # a fixed sample keeps in-epoch validation cheap
    warmup_share: float = 0.03
    min_lr_share: float = 0.1  # the cosine ends at this share of the rate
    seed: int = 0
    max_train_rows: int | None = None

    def total_steps(self, train_rows: int) -> int:
        per_epoch = max(1, math.ceil(train_rows / self.batch_size))
        total = per_epoch * self.epochs
        return max(1, min(total, self.max_steps) if self.max_steps else total)

    def validate_every(self, train_rows: int) -> int:
        per_epoch = max(1, math.ceil(train_rows / self.batch_size))
        return max(1, min(per_epoch, math.ceil(self.total_steps(train_rows)
                                               / max(self.validations, 1))))

    def lr_factor(self, step: int, total: int) -> float:
        """Linear warm-up, then cosine decay to `min_lr_share` at the end of the budget."""
        warm = max(1, int(self.warmup_share * total))
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return self.min_lr_share + (1 - self.min_lr_share) * 0.5 * (1 + math.cos(math.pi *
                                                                                 progress))


@dataclass
class FitResult:
    best_epoch: int
    best_valid_loss: float
    history: list[dict[str, float]] = field(default_factory=list)
    best_step: int = 0
    steps: int = 0


def to_torch(batch: dict[str, np.ndarray], device: torch.device) -> Batch:
    """Numpy batch -> tensors; integer ids stay int64, labels become float32."""
    out: Batch = {}
    for name, arr in batch.items():
        tensor = torch.from_numpy(np.ascontiguousarray(arr))
        if tensor.dtype.is_floating_point:
            tensor = tensor.float()
        elif tensor.dtype != torch.int64 and tensor.dtype != torch.bool:
            tensor = tensor.long()
        out[name] = tensor.to(device, non_blocking=True)
    return out


def iterate(source: BatchSource, idx: np.ndarray, batch_size: int, device: torch.device,
            rng: np.random.Generator | None = None) -> Iterator[Batch]:
    order = rng.permutation(idx) if rng is not None else idx
    for start in range(0, len(order), batch_size):
        yield to_torch(source.batch(order[start:start + batch_size]), device)


def make_optimizers(model: torch.nn.Module, cfg: FitConfig) -> list[torch.optim.Optimizer]:
    """SparseAdam (or Adagrad) for sparse embedding tables (only touched rows move), Adam for
    the rest."""
    if cfg.sparse_optimizer == "adam":
        return build_optimizers(model, lr=cfg.lr, sparse_lr=cfg.sparse_lr)
    if cfg.sparse_optimizer != "adagrad":
        raise ValueError(f"sparse_optimizer must be adam or adagrad, got {cfg.sparse_optimizer!r}")
    sparse, dense = split_parameters(model)
    optimizers: list[torch.optim.Optimizer] = []
    if sparse:
        optimizers.append(torch.optim.Adagrad(sparse, lr=cfg.sparse_lr,
                                              initial_accumulator_value=cfg.adagrad_init))
    if dense:
        optimizers.append(torch.optim.Adam(dense, lr=cfg.lr))
    return optimizers


@torch.no_grad()
def mean_loss(model: torch.nn.Module, step_loss: StepLoss, source: BatchSource,
              idx: np.ndarray, batch_size: int, device: torch.device) -> float:
    model.eval()
    total, rows = 0.0, 0
    for batch in iterate(source, idx, batch_size * 4, device):
        n = next(iter(batch.values())).shape[0]
        total += float(step_loss(model, batch)) * n
        rows += n
    return total / max(rows, 1)


ValidScore = Callable[[torch.nn.Module, np.ndarray], float]


def fit(model: torch.nn.Module, step_loss: StepLoss, source: BatchSource, train_idx: np.ndarray,
        valid_idx: np.ndarray, cfg: FitConfig, device: torch.device,
        progress: Progress | None = None, name: str = "model",
        valid_score: ValidScore | None = None) -> FitResult:
    """Train with early stopping on validation loss and restore the best point's weights.

    With `valid_score` (higher is better, e.g. the validation CTR AUC of a ranker) the best
    point is chosen by it; the loss is still recorded. Ranking is what a ranker is for, and the
    validation loss also moves with calibration drift between the training and validation days.

    Reproducible: the torch and batch-order generators are seeded here and deterministic
    kernels are asked for (warn-only) while training, so the same seed, data and thread count
    give the same weights.
    """
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    if cfg.max_train_rows and len(train_idx) > cfg.max_train_rows:
        train_idx = np.sort(rng.choice(train_idx, cfg.max_train_rows, replace=False))
    if cfg.valid_max_rows and len(valid_idx) > cfg.valid_max_rows:
        valid_idx = np.sort(np.random.default_rng(cfg.seed + 1).choice(
            valid_idx, cfg.valid_max_rows, replace=False))
    model.to(device)
    optimizers = make_optimizers(model, cfg)
    base_lrs = [[g["lr"] for g in opt.param_groups] for opt in optimizers]
    total = cfg.total_steps(len(train_idx))
    every = cfg.validate_every(len(train_idx))
    per_epoch = max(1, math.ceil(len(train_idx) / cfg.batch_size))
    result = FitResult(best_epoch=-1, best_valid_loss=math.inf)
    best_state = None
    best_target = math.inf
    stale, step, running = 0, 0, 0.0
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        for epoch in range(cfg.epochs):
            if step >= total or stale > cfg.patience:
                break
            model.train()
            if progress:
                progress.start(f"{name} epoch {epoch + 1}", min(per_epoch, total - step))
            for batch in iterate(source, train_idx, cfg.batch_size, device, rng):
                factor = cfg.lr_factor(step, total)
                for opt, lrs in zip(optimizers, base_lrs, strict=True):
                    for group, lr in zip(opt.param_groups, lrs, strict=True):
                        group["lr"] = lr * factor
                    opt.zero_grad(set_to_none=True)
                loss = step_loss(model, batch)
                loss.backward()
                for opt in optimizers:
                    opt.step()
                value = loss.detach().item()
                running = value if step == 0 else 0.98 * running + 0.02 * value
                step += 1
                if progress:
                    progress.advance(running)
                # every `every` steps and at each epoch's end: the one-epoch phenomenon makes
                # the end of the first pass the usual best point, so it is always measured
                if step % every == 0 or step % per_epoch == 0 or step == total:
                    valid_loss = mean_loss(model, step_loss, source, valid_idx, cfg.batch_size,
                                           device)
                    point = {"epoch": epoch + 1, "step": step, "train_loss": round(running, 6),
                             "valid_loss": round(valid_loss, 6)}
                    target = valid_loss
                    if valid_score is not None:
                        point["valid_score"] = round(valid_score(model, valid_idx), 6)
                        target = -point["valid_score"]
                    model.train()
                    result.history.append(point)
                    if target < best_target - 1e-5:
                        best_target = target
                        result.best_valid_loss, result.best_epoch = valid_loss, epoch + 1
                        result.best_step, stale = step, 0
                        best_state = copy.deepcopy(model.state_dict())
                    else:
                        stale += 1
                if step >= total or stale > cfg.patience:
                    break
            if progress:
                progress.finish(f"{name} epoch {epoch + 1} (step {step}/{total}): train "
                                f"{running:.4f} best valid {result.best_valid_loss:.4f} "
                                f"at step {result.best_step}")
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    result.steps = step
    return result


def predict(model: torch.nn.Module, fn: Callable[[torch.nn.Module, Batch], Any],
            source: BatchSource, idx: np.ndarray, batch_size: int,
            device: torch.device) -> dict[str, np.ndarray]:
    """Run `fn` over rows in eval mode and concatenate each output as numpy."""
    model.eval()
    parts: dict[str, list[np.ndarray]] = {}
    with torch.inference_mode():
        for batch in iterate(source, idx, batch_size, device):
            for key, value in fn(model, batch).items():
                parts.setdefault(key, []).append(value.float().cpu().numpy())
    return {k: np.concatenate(v) for k, v in parts.items()}
