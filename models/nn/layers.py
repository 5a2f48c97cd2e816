"""Reusable blocks every Cascade network is composed of: embeddings, MLP, Dice, pooling.

Inputs everywhere are `dict[str, Tensor]` keyed by schema feature names: int64 ids, scalars
shaped [B], behaviour sequences shaped [B, L] with 0 = padding (newest first).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from models.features.schema import GROUPS, FeatureSchema

Batch = Mapping[str, torch.Tensor]


class EmbeddingCollection(nn.Module):
    """One `nn.Embedding` per table owner; a feature that `shares` reads its owner's table.

    Why one collection per model (not one per tower): the behaviour sequence must read the same
    rows as the candidate ad, which is what makes DIN's q·k meaningful, and a table that exists
    once is saved once (safetensors refuses aliased tensors).

    Example::

        emb = EmbeddingCollection(schema, ("user", "behaviour", "ad"))
        emb(batch, "ad")         # [B, sum of ad dims]
        emb(batch, "behaviour")  # [B, L, sum of behaviour dims]
    """

    def __init__(
        self,
        schema: FeatureSchema,
        groups: Sequence[str] = GROUPS,
        sparse: bool = False,
        init_std: float = 0.01,
    ) -> None:
        super().__init__()
        unknown = set(groups) - set(GROUPS)
        if unknown:
            raise ValueError(f"unknown feature groups {sorted(unknown)}")
        self.schema = schema
        self.groups = tuple(groups)
        self.feature_names = tuple(n for g in self.groups for n in schema.names(g))
        self.owner = {n: schema.table_owner(n).name for n in self.feature_names}
        self.tables = nn.ModuleDict()
        for name in self.feature_names:
            owner = schema.table_owner(name)
            if owner.name in self.tables:
                continue
            table = nn.Embedding(owner.rows, owner.dim, padding_idx=0, sparse=sparse)
            nn.init.normal_(table.weight, std=init_std)
            with torch.no_grad():
                table.weight[0].zero_()
            self.tables[owner.name] = table

    def dim(self, names: Iterable[str]) -> int:
        """Width of the concatenation of `names`' embeddings."""
        return sum(self.schema[n].dim for n in names)

    def group_dim(self, group: str) -> int:
        return self.dim(self.schema.names(group))

    def embed(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        """Rows for one feature; ids must stay integers (a float id collides above 2^24)."""
        if ids.is_floating_point() or ids.dtype == torch.bool:
            raise TypeError(f"feature '{name}' must be an integer tensor, got {ids.dtype}")
        return self.tables[self.owner[name]](ids)

    def lookup(self, batch: Batch, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Embed each named feature once; callers slice the dict instead of re-running tables."""
        out: dict[str, torch.Tensor] = {}
        for name in names:
            if name not in batch:
                raise KeyError(f"batch has no feature '{name}'")
            out[name] = self.embed(name, batch[name])
        return out

    def forward(self, batch: Batch, group: str) -> torch.Tensor:
        """Concatenated embeddings of a group: [B, D] for scalars, [B, L, D] for sequences."""
        names = self.schema.names(group)
        embs = self.lookup(batch, names)
        return torch.cat([embs[n] for n in names], dim=-1)

    def sequence_mask(self, batch: Batch) -> torch.Tensor:
        """[B, L] bool: a behaviour is real when any of its fields is not padding."""
        names = self.schema.names("behaviour")
        mask = batch[names[0]] != 0
        for name in names[1:]:
            mask = mask | (batch[name] != 0)
        return mask

    def mba_l2(self, batch: Batch, lam: float) -> torch.Tensor:
        """Mini-batch-aware L2 (DIN paper): only rows present in the batch, each over its count.

        Summed over each table's distinct non-pad ids j in the batch: lam * ||w_j||^2 / n_j,
        with n_j the number of occurrences of j in the batch (a sequence and the target that
        share a table count together). The rows are looked up, never the whole weight matrix,
        so absent ids get exactly zero gradient and sparse tables keep sparse gradients.
        """
        by_table: dict[str, list[torch.Tensor]] = {}
        for name in self.feature_names:
            if name not in batch:
                raise KeyError(f"batch has no feature '{name}'")
            by_table.setdefault(self.owner[name], []).append(batch[name].reshape(-1))
        total: torch.Tensor | None = None
        for owner, parts in by_table.items():
            ids = torch.cat(parts)
            ids = ids[ids != 0]
            if ids.numel() == 0:
                continue
            unique, counts = torch.unique(ids, return_counts=True)
            rows = self.tables[owner](unique)
            term = (rows.pow(2).sum(-1) / counts.to(rows.dtype)).sum()
            total = term if total is None else total + term
        if total is None:
            first = next(iter(self.tables.values())).weight
            return first.new_zeros(())
        return lam * total


class Dice(nn.Module):
    """Dice activation (DIN): p(x)·x + (1 − p(x))·α·x with p = sigmoid(BN(x)), BN without affine.

    Per-neuron batch statistics in training and running statistics in eval, so a served row's
    score never depends on its batch neighbours. Accepts [..., dim] (sequences are flattened).
    """

    def __init__(self, dim: int, eps: float = 1e-8, momentum: float = 0.1) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, eps=eps, momentum=momentum, affine=False)
        self.alpha = nn.Parameter(torch.zeros(dim))
        self._serving: tuple[tuple, tuple[torch.Tensor, ...]] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # p·x + (1 − p)·α·x = x·(α + (1 − α)·p): fewer passes over large serving tensors.
        if not (self.training or torch.is_grad_enabled()):
            return self._serve(x)
        gate = torch.sigmoid(self._normalise(x))
        return x * torch.addcmul(self.alpha, gate, 1.0 - self.alpha)

    def _serve(self, x: torch.Tensor) -> torch.Tensor:
        """Eval without autograd: the same arithmetic with one new tensor, every later pass in
        place, and the per-neuron constants computed once. The attention's [L, N, H]
        activations are the ranker's largest tensors: a fresh tensor per pass cost about a
        sixth of the Dice time there, and the constants five small ops per layer per call."""
        shift, scale, alpha, keep = self._serving_constants()
        gate = torch.addcmul(shift, x, scale)
        gate.sigmoid_()
        torch.addcmul(alpha, gate, keep, out=gate)
        return gate.mul_(x)

    def _serving_constants(self) -> tuple[torch.Tensor, ...]:
        """(−mean/std, 1/std, α, 1 − α), cached until a statistic or α changes (in place, as
        training and `load_state_dict` do, or by a move to another device or dtype). Tensors
        made under inference mode (a served bundle's) keep no version counter; nothing trains
        them in place."""
        sources = (self.bn.running_mean, self.bn.running_var, self.alpha)
        state = tuple((t.data_ptr(), t.dtype, -1 if t.is_inference() else t._version)
                      for t in sources)
        if self._serving is None or self._serving[0] != state:
            with torch.no_grad():
                alpha = self.alpha.detach()
                self._serving = (state, (*self._running_affine(), alpha, 1.0 - alpha))
        return self._serving[1]

    def _running_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(−mean/std, 1/std): BN on running statistics as one fused multiply-add."""
        inv_std = torch.rsqrt(self.bn.running_var + self.bn.eps)
        return -self.bn.running_mean * inv_std, inv_std

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.numel() > x.shape[-1]:
            return self.bn(x.reshape(-1, x.shape[-1])).reshape(x.shape)
        # Eval (or a single training row, which has no variance): running statistics.
        shift, scale = self._running_affine()
        return torch.addcmul(shift, x, scale)


def make_activation(name: str, dim: int) -> nn.Module:
    """Activation by config name; PReLU uses one shared slope so it works on [B, L, H] too."""
    if name == "relu":
        return nn.ReLU()
    if name == "prelu":
        return nn.PReLU()
    if name == "dice":
        return Dice(dim)
    raise ValueError(f"unknown activation '{name}' (expected relu, prelu or dice)")


class MLP(nn.Module):
    """Linear → activation (→ dropout) per hidden size, then an optional linear output layer.

    Example: `MLP(126, (128, 64), "dice", out_dim=1)` is an ESMM tower.
    """

    def __init__(
        self,
        in_dim: int,
        hidden: Sequence[int],
        activation: str = "relu",
        dropout: float = 0.0,
        out_dim: int | None = None,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_dim
        for width in hidden:
            layers += [nn.Linear(prev, width), make_activation(activation, width)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            prev = width
        if out_dim is not None:
            layers.append(nn.Linear(prev, out_dim))
            prev = out_dim
        self.net = nn.Sequential(*layers)
        self.out_dim = prev

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def init_output_bias(self, value: float) -> None:
        """Start the output at a known log-odds. A click tower that starts at 0 (p = 0.5)
        spends thousands of Adam steps walking its bias to a 2% base rate; starting there
        lets every step go to the signal."""
        last = self.net[-1]
        if not isinstance(last, nn.Linear) or last.bias is None:
            raise ValueError("init_output_bias needs an MLP ending in a biased linear layer")
        with torch.no_grad():
            last.bias.fill_(value)


def log_odds(p: float) -> float:
    """logit(p), clamped away from 0 and 1."""
    p = min(max(float(p), 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


def masked_sum(seq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of [B, L, D] over real positions (pads contribute exactly nothing)."""
    return (seq * mask.unsqueeze(-1).to(seq.dtype)).sum(dim=1)


def masked_mean(seq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real positions; an empty history gives zeros, not NaN."""
    count = mask.sum(dim=1, keepdim=True).clamp(min=1).to(seq.dtype)
    return masked_sum(seq, mask) / count


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(sparse, dense) parameters: sparse tables go to SparseAdam, the rest to Adam."""
    sparse: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding) and module.sparse and id(module.weight) not in seen:
            seen.add(id(module.weight))
            sparse.append(module.weight)
    dense = [p for p in model.parameters() if id(p) not in seen and p.requires_grad]
    return sparse, dense


def build_optimizers(
    model: nn.Module, lr: float = 1e-3, weight_decay: float = 0.0,
    sparse_lr: float | None = None,
) -> list[torch.optim.Optimizer]:
    """SparseAdam for sparse tables (touches only the rows in the batch) + Adam for the rest.

    Call `zero_grad` and `step` on each. Weight decay applies to dense weights only: embedding
    rows are regularised by `mba_l2`, which only touches rows present in the batch.
    """
    sparse, dense = split_parameters(model)
    optimizers: list[torch.optim.Optimizer] = []
    if sparse:
        optimizers.append(torch.optim.SparseAdam(sparse, lr=lr if sparse_lr is None else sparse_lr))
    if dense:
        optimizers.append(torch.optim.Adam(dense, lr=lr, weight_decay=weight_decay))
    return optimizers
