"""The ranker as a teacher for retrieval: sampled candidates per row, scored by DIN+ESMM.

Why: the two-tower learns from clicks alone which ads a user clicks among those shown, not
which ads the ranker would put on top among the whole corpus; the funnel loses exactly the ads
the ranker wants and retrieval never surfaces. For each training row, `source` adds S sampled
ads (half the other rows' positives, half uniform over the catalog) with the ranker's log pCTR
for that user, and `TwoTower.distill_loss` matches the tower's softmax over them to the
ranker's.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models.nn.two_tower import CANDIDATE


class RankerTeacher:
    """A trained DIN+ESMM and the encoded catalog the candidates are drawn from."""

    def __init__(self, ranker: torch.nn.Module, catalog: dict[str, np.ndarray],
                 device: torch.device) -> None:
        self.ranker = ranker.eval()
        self.catalog = catalog
        self.device = device
        self.ad_names = list(catalog)

    def source(self, inner: Any, candidates: int, seed: int) -> _TeacherSource:
        return _TeacherSource(self, inner, candidates, seed)

    @torch.no_grad()
    def log_pctr(self, batch: dict[str, np.ndarray], cands: dict[str, np.ndarray]
                 ) -> np.ndarray:
        """[B, S] ranker log pCTR of each row's user (history, scene) against its S ads."""
        rows, s = cands[self.ad_names[0]].shape
        expanded: dict[str, torch.Tensor] = {}
        for name, values in batch.items():
            if name in cands or values.ndim == 0 or values.shape[0] != rows:
                continue
            tensor = torch.from_numpy(np.ascontiguousarray(values))
            if tensor.dtype.is_floating_point:
                continue  # labels and log_q: the ranker reads ids only
            expanded[name] = tensor.long().repeat_interleave(s, dim=0).to(self.device)
        for name, values in cands.items():
            expanded[name] = torch.from_numpy(values.reshape(-1)).long().to(self.device)
        logit = self.ranker(expanded)["ctr_logit"]
        return F.logsigmoid(logit).float().cpu().numpy().reshape(rows, s)


class _TeacherSource:
    """Batch source: the inner batch plus `cand:<ad feature>` [B, S] and `teacher` [B, S]."""

    def __init__(self, teacher: RankerTeacher, inner: Any, candidates: int, seed: int) -> None:
        self.teacher, self.inner, self.candidates = teacher, inner, candidates
        self.rng = np.random.default_rng(seed + 7)
        self.n_catalog = next(iter(teacher.catalog.values())).shape[0]

    def batch(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        out = self.inner.batch(idx)
        rows = len(idx)
        in_batch = self.candidates // 2
        uniform = self.candidates - in_batch
        other = self.rng.integers(0, rows, size=(rows, in_batch))
        drawn = self.rng.integers(0, self.n_catalog, size=(rows, uniform))
        cands = {}
        for name in self.teacher.ad_names:
            cands[name] = np.concatenate(
                [out[name][other], self.teacher.catalog[name][drawn]], axis=1).astype(np.int64)
        out["teacher"] = self.teacher.log_pctr(out, cands)
        for name, values in cands.items():
            out[CANDIDATE + name] = values
        return out
