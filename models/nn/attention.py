"""DIN's local activation unit: target attention of a candidate ad over the behaviour sequence.

Two paths compute the same pooling:
- `forward(query [B, D], keys [B, L, D], mask [B, L])` for training, one candidate per row;
- `pool_candidates(cand [N, D], hist [L, D], mask [L])` for serving one user against N
  candidates. The first linear layer on [q, k, q−k, q·k] is split as
  (W1+W3)·q + (W2−W3)·k + W4·(q·k) + b, so the candidate term runs once per candidate and
  the rest is one GEMM of the behaviours against per-candidate weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.nn.layers import MLP, make_activation


class ActivationUnit(nn.Module):
    """[q, k, q−k, q·k] → MLP → one weight per behaviour; pooled = Σ weight·k.

    No softmax by default (DIN keeps the intensity of interest); `softmax=True` normalises over
    the real behaviours. Padded positions never enter the MLP and get exactly zero weight, and
    an empty history pools to zeros. Skipping pads also keeps Dice's training statistics free of
    padding, so adding pads changes nothing in training either.
    """

    def __init__(
        self,
        dim: int,
        hidden: Sequence[int] = (32, 16),
        activation: str = "dice",
        softmax: bool = False,
    ) -> None:
        super().__init__()
        if not hidden:
            raise ValueError("ActivationUnit needs at least one hidden layer")
        self.dim = dim
        self.softmax = softmax
        self.first = nn.Linear(4 * dim, hidden[0])
        self.first_act = make_activation(activation, hidden[0])
        self.rest = MLP(hidden[0], tuple(hidden[1:]), activation, out_dim=1)

    def weights(self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, L] attention weights; exactly 0 at padded positions."""
        batch, length, _ = keys.shape
        q = query.unsqueeze(1).expand(batch, length, self.dim)[mask]
        k = keys[mask]
        if k.shape[0] == 0:
            return keys.new_zeros(batch, length)
        hidden = self.first_act(self.first(torch.cat([q, k, q - k, q * k], dim=-1)))
        logits = self.rest(hidden).squeeze(-1)
        if not self.softmax:
            return logits.new_zeros(batch, length).masked_scatter(mask, logits)
        full = logits.new_full((batch, length), float("-inf")).masked_scatter(mask, logits)
        return torch.softmax(full, dim=-1).nan_to_num(0.0) * mask.to(logits.dtype)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Pooled behaviour [B, D] for one candidate (`query`) per row."""
        w = self.weights(query, keys, mask)
        return torch.bmm(w.unsqueeze(1).to(keys.dtype), keys).squeeze(1)

    def pool_candidates(
        self, cand: torch.Tensor, hist: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Serving path: [N, D] pooled behaviour for N candidates of one user (decomposed)."""
        hist = hist[mask]
        if hist.shape[0] == 0:
            return cand.new_zeros(cand.shape[0], self.dim)
        n_cand, n_hist, dim = cand.shape[0], hist.shape[0], self.dim
        w_q, w_k, w_diff, w_prod = self.first.weight.split(dim, dim=1)  # each [H, D]
        width = w_q.shape[0]
        cand_term = F.linear(cand, w_q + w_diff, self.first.bias)  # once per candidate
        # The pair term W4 (c ∘ h) = (W4 diag(c)) h and the behaviour term (W2 − W3) h are both
        # linear in h: one GEMM of the history against per-candidate weights
        # [D, N·H] = c_n ∘ W4ᵀ + (W2 − W3)ᵀ (layout [L, N, H]) gives both, and the candidate
        # term enters as the GEMM's broadcast bias row: no [L, N, H] broadcast-add pass.
        pair = torch.addcmul((w_k - w_diff).T.unsqueeze(1), cand.T.unsqueeze(2),
                             w_prod.T.unsqueeze(1)).reshape(dim, -1)
        pre = torch.addmm(cand_term.reshape(-1), hist, pair).reshape(n_hist, n_cand, width)
        logits = self.rest(self.first_act(pre)).squeeze(-1).T  # [N, L_real]
        w = torch.softmax(logits, dim=-1) if self.softmax else logits
        return w.to(hist.dtype) @ hist
