"""Offline metrics for CTR/CVR ranking and retrieval, vectorised numpy.

Evaluation runs over millions of impressions, models and the oracle alike, so every metric
here is a handful of sorts and bincounts: no Python loop per user or per query. AUCs use
averaged ranks so that tied scores (common for the oracle and for calibrated baselines)
count one half, as the Mann-Whitney statistic does.
"""

from __future__ import annotations

import numpy as np

__all__ = ["auc", "gauc", "logloss", "calibration", "spearman", "recall_at_k", "average_ranks"]


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of `values`, ties sharing the mean of their ranks (float64)."""
    values = np.asarray(values)
    n = values.shape[0]
    order = np.argsort(values, kind="mergesort")
    sorted_vals = values[order]
    new_group = np.empty(n, dtype=bool)
    if n:
        new_group[0] = True
        new_group[1:] = sorted_vals[1:] != sorted_vals[:-1]
    starts = np.flatnonzero(new_group)
    ends = np.append(starts[1:], n)  # exclusive
    mean_rank = (starts + ends + 1) / 2.0  # mean of 1-based ranks start+1..end
    group_of = np.cumsum(new_group) - 1
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = mean_rank[group_of]
    return ranks


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC (probability a random positive outscores a random negative; ties count 1/2).

    NaN when only one class is present, since the number is undefined there.
    """
    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"auc: labels {y.shape} and scores {s.shape} differ in shape")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = average_ranks(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def gauc(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray) -> float:
    """Impression-weighted mean of per-group (per-user) AUC, skipping single-class groups.

    This is what the DIN paper reports: a global AUC mixes users with different base rates,
    while GAUC asks whether each user's own ads are ordered well.
    """
    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    g = np.asarray(groups).ravel()
    if not (y.shape == s.shape == g.shape):
        raise ValueError("gauc: labels, scores and groups must have the same length")
    n = y.size
    if n == 0:
        return float("nan")
    order = np.lexsort((s, g))  # by group, then score
    g_sorted, s_sorted, y_sorted = g[order], s[order], y[order]
    group_start = np.empty(n, dtype=bool)
    group_start[0] = True
    group_start[1:] = g_sorted[1:] != g_sorted[:-1]
    tie_start = group_start.copy()
    tie_start[1:] |= s_sorted[1:] != s_sorted[:-1]
    gid = np.cumsum(group_start) - 1
    first_of_group = np.flatnonzero(group_start)
    # 1-based rank inside the group, then averaged over runs of tied scores
    pos = np.arange(n) - first_of_group[gid] + 1.0
    tid = np.cumsum(tie_start) - 1
    tie_sum = np.bincount(tid, weights=pos)
    tie_len = np.bincount(tid)
    rank = (tie_sum / tie_len)[tid]
    n_groups = first_of_group.size
    size = np.bincount(gid, minlength=n_groups).astype(np.float64)
    n_pos = np.bincount(gid, weights=y_sorted, minlength=n_groups)
    rank_pos = np.bincount(gid, weights=rank * y_sorted, minlength=n_groups)
    n_neg = size - n_pos
    valid = (n_pos > 0) & (n_neg > 0)
    if not valid.any():
        return float("nan")
    per_group = (rank_pos[valid] - n_pos[valid] * (n_pos[valid] + 1) / 2.0) / (
        n_pos[valid] * n_neg[valid])
    return float(np.average(per_group, weights=size[valid]))


def logloss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy; probabilities are clipped so one certain mistake is finite."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    p = np.clip(np.asarray(probs, dtype=np.float64).ravel(), eps, 1.0 - eps)
    if y.size == 0:
        return float("nan")
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def calibration(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean predicted probability over observed rate: 1.0 is calibrated, >1 over-predicts."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    p = np.asarray(probs, dtype=np.float64).ravel()
    rate = y.mean() if y.size else 0.0
    if rate == 0:
        return float("nan")
    return float(p.mean() / rate)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (ties averaged); NaN when either side is constant."""
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError("spearman: inputs must have the same length")
    if x.size < 2:
        return float("nan")
    rx, ry = average_ranks(x), average_ranks(y)
    rx -= rx.mean()
    ry -= ry.mean()
    denom = np.sqrt((rx * rx).sum() * (ry * ry).sum())
    if denom == 0:
        return float("nan")
    return float((rx * ry).sum() / denom)


def recall_at_k(retrieved: np.ndarray, query: np.ndarray, item: np.ndarray, k: int,
                block_rows: int = 4096) -> float:
    """Share of relevant (query, item) pairs whose item is in the top-`k` of that query's list.

    `retrieved[q]` is query q's ranked list of item ids (pad with -1 when shorter);
    `query[i]`, `item[i]` name the i-th relevant pair, e.g. a clicked ad of a request. The
    average is over pairs (micro recall), so a request with three clicks weighs three times.
    Pairs are processed in blocks so a K of 1000 over many pairs stays within memory.
    """
    retrieved = np.asarray(retrieved)
    q = np.asarray(query, dtype=np.int64).ravel()
    it = np.asarray(item).ravel()
    if retrieved.ndim != 2:
        raise ValueError("recall_at_k: retrieved must be a 2-D [queries, K] array")
    if q.shape != it.shape:
        raise ValueError("recall_at_k: query and item must have the same length")
    if k < 1:
        raise ValueError(f"recall_at_k: k must be >= 1 (got {k})")
    if q.size == 0:
        return float("nan")
    top = retrieved[:, :k]
    hits = 0
    for start in range(0, q.size, block_rows):
        rows = top[q[start:start + block_rows]]
        hits += int((rows == it[start:start + block_rows, None]).any(axis=1).sum())
    return hits / q.size
