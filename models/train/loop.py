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

from models.nn import build_optimizers

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
    """Loop settings; the defaults train every model on `small` well inside the CPU budget."""

    # CTR models over sparse ids overfit from the second pass on (the "one-epoch phenomenon":
    # each id row memorises its few impressions); measured here too, so one epoch is the
    # default and `fit` keeps the best epoch by validation loss when more are asked for.
    epochs: int = 1
    batch_size: int = 2048
    lr: float = 2e-3
    # Adam-style steps move every touched row by ~lr whatever its gradient, so a rare ad's
    # embedding is jolted by each of its few impressions: keep the sparse rate as low as dense.
    sparse_lr: float = 2e-3
    patience: int = 0
    seed: int = 0
    max_train_rows: int | None = None


@dataclass
class FitResult:
    best_epoch: int
    best_valid_loss: float
    history: list[dict[str, float]] = field(default_factory=list)


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
    """SparseAdam for sparse embedding tables (only touched rows move), Adam for the rest."""
    return build_optimizers(model, lr=cfg.lr, sparse_lr=cfg.sparse_lr)


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


def fit(model: torch.nn.Module, step_loss: StepLoss, source: BatchSource, train_idx: np.ndarray,
        valid_idx: np.ndarray, cfg: FitConfig, device: torch.device,
        progress: Progress | None = None, name: str = "model") -> FitResult:
    """Train with early stopping on validation loss and restore the best epoch's weights."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    if cfg.max_train_rows and len(train_idx) > cfg.max_train_rows:
        train_idx = np.sort(rng.choice(train_idx, cfg.max_train_rows, replace=False))
    model.to(device)
    optimizers = make_optimizers(model, cfg)
    best_loss, best_epoch, best_state = math.inf, -1, None
    result = FitResult(best_epoch=-1, best_valid_loss=math.inf)
    stale = 0
    for epoch in range(cfg.epochs):
        model.train()
        if progress:
            steps = math.ceil(len(train_idx) / cfg.batch_size)
            progress.start(f"{name} epoch {epoch + 1}/{cfg.epochs}", steps)
        running = 0.0
        for step, batch in enumerate(iterate(source, train_idx, cfg.batch_size, device, rng)):
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            loss = step_loss(model, batch)
            loss.backward()
            for opt in optimizers:
                opt.step()
            value = loss.detach().item()
            running = value if step == 0 else 0.98 * running + 0.02 * value
            if progress:
                progress.advance(running)
        valid_loss = mean_loss(model, step_loss, source, valid_idx, cfg.batch_size, device)
        result.history.append({"epoch": epoch + 1, "train_loss": running,
                               "valid_loss": valid_loss})
        if progress:
            progress.finish(f"{name} epoch {epoch + 1}: train {running:.4f} valid {valid_loss:.4f}")
        if valid_loss < best_loss - 1e-5:
            best_loss, best_epoch, stale = valid_loss, epoch + 1, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
            if stale > cfg.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    result.best_epoch, result.best_valid_loss = best_epoch, best_loss
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
