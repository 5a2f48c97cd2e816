"""Candidate retrieval: the user's vector against the ad index, under eligibility rules.

`Recall` is the plain class behind the retrieval stage (the FastAPI app is a thin adapter).

Eligibility (active status, scene targeting, per-request exclusions) is applied to faiss results
by over-fetching: ask for K / (share of eligible ads) plus a margin (`fetch_for`), drop the
ineligible, and if K is still short, double the fetch (then nprobe, up to exhaustive) until K is
met or the eligible corpus is exhausted. This keeps one code path for any ad-id space (faiss
bitmap selectors would need small dense ids) and costs nothing extra when nearly everything is
eligible.

Concurrency: searches never take a lock. Ads added after the bundle was built live in a small
exact side index ("fresh" ads) that is copied-on-write, and the catalog arrays are replaced, not
resized, when an ad is added; a search works on the snapshot it started with. A pause flips one
element of a boolean array in place: it takes effect for the next search. Writers serialise on
one lock. The main index is never mutated after load.

Channels: with a user vector, recall merges several candidate sources, each with a quota (a
share of K, `ChannelQuotas`): the two-tower ANN (`two_tower`); the best ads by Qscore eCPM in the
categories of the user's recent behaviours (`category`, from per-category top lists built once
per scene, columnar); the catalog's best ads by Qscore eCPM (`high_value`); and ads added since
the bundle (`new`). Duplicates keep the first channel in that order; a channel short of its
quota leaves its room to the two-tower. Every candidate carries its channel (`channels`, codes
into `CHANNELS`), so the gateway's debug output and the funnel can say where it came from.

Value-aware indexes (`value`: the index's `ValueTerm`) hold [a/|a|, w·(log v − mu)] per ad: user
vectors are searched as [u/|u|, 1] and a newly added ad is indexed with its cold-start score as
v, so callers keep passing plain ad-tower vectors of the tower's dimension. Re-adding a known ad
or refreshing cold-start scores does not move its value term (the next bundle does).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import faiss
import numpy as np

from services.common.id_index import IdIndex
from services.retrieval.index import ValueTerm, augment_queries, index_nprobe, normalize

ACTIVE = "active"
PAUSED = "paused"
STATUSES = (ACTIVE, PAUSED)
DEFAULT_K = 2000
CHANNEL_VECTOR = "two_tower"
CHANNEL_COLD = "cold_start"
CHANNEL_CATEGORY = "category"
CHANNEL_VALUE = "high_value"
CHANNEL_NEW = "new"
# Codes of RecallResult.channels (and of the wire's `channels`): index into this tuple.
CHANNELS = (CHANNEL_VECTOR, CHANNEL_CATEGORY, CHANNEL_VALUE, CHANNEL_NEW, CHANNEL_COLD)
CODE = {name: np.int8(i) for i, name in enumerate(CHANNELS)}
HIST_CATEGORY = "hist_category_id"  # the behaviour column holding each behaviour's category
FETCH_SD = 4.0  # binomial standard deviations of slack in the eligible count (`fetch_for`)
FETCH_MARGIN = 1.02  # and a relative margin for eligibility that clusters in vector space
PROBE_DEPTH = 1.75  # lists are searched as deep as K / share x this (`probe_depth`)


def fetch_for(k: int, total: int, n_eligible: int, margin: float = FETCH_MARGIN) -> int:
    """How many ANN results to ask for so that K of them are eligible, nearly always.

    If a share p of the catalog is eligible, the eligible count among the top f results is
    about Binomial(f, p): f = (K + z·sqrt(K·(1 − p))) / p leaves z standard deviations of slack
    (z = FETCH_SD), times a small margin for correlation (a paused campaign's ads sit together
    in vector space). A shortfall is still caught by `Recall._search`'s retry. A flat x1.25
    over K / p asked for 20% more: at 1M ads with 92% eligible, 2,729 results against 2,286.
    How many lists are searched is `probe_depth`'s to say.
    """
    share = n_eligible / max(total, 1)
    need = k + FETCH_SD * math.sqrt(k * max(0.0, 1.0 - share))
    return min(total, int(math.ceil(need * margin / max(share, 1e-12))) + 16)


def probe_depth(k: int, total: int, n_eligible: int) -> int:
    """The result depth nprobe is scaled to (nprobe x depth / tuned K): K / share x
    PROBE_DEPTH. The lists searched set the recall; the fetch itself only sizes faiss's heap
    and the results screened (at 1M ads, 2,286 instead of 2,729 results saved 0.08 ms of 1.02).

    Why 1.75: the tuned nprobe reaches the target recall on the training users' vectors, and
    served queries miss it by a margin that varies from bundle to bundle. On the bench's
    queries at 1M ads, against the exact top K of the eligible ads, x1.25 gave recall 0.950
    on one bundle (nprobe 164 tuned, 225 searched) and 0.937 on the next (195 tuned, 266
    searched); on the latter x1.5 gave 0.951, x1.6 0.956 and x1.75 0.962, for 0.2-0.3 ms
    more per search (faiss's scan grows slowly with the lists: most of it is fixed cost)."""
    return min(total, int(math.ceil(k * total / max(n_eligible, 1) * PROBE_DEPTH)) + 16)


@dataclass(frozen=True)
class ChannelQuotas:
    """Shares of K for the channels beside the two-tower (which gets the rest), and how many
    of the user's most recent distinct categories the category channel reads.

    Defaults: most of K stays with the personalised ANN; 0.3 goes to the best ads of the user's
    10 most recent distinct categories (the ranker's interest match and attention look there:
    on `small`, 55% of the full ranker's top 10 lie in the user's history categories, and on
    60 validation requests the share of that top 10 reaching the ranker rose from 0.447 at
    0.05 of K over 5 categories to 0.592 at 0.3 over 10, saturating at 0.603 with 0.4 over 20),
    a tenth to the catalog's top eCPM ads (expensive ads the cosine under-rates; removing it
    cost 0.06 of that share), and a little to ads newer than the bundle, which the index knows
    only through their ad-tower vector. A dataset's own `choose_ks` curves may say otherwise.
    """

    category: float = 0.3
    high_value: float = 0.1
    new: float = 0.02
    recent_categories: int = 10

    def __post_init__(self) -> None:
        shares = (self.category, self.high_value, self.new)
        if any(not 0.0 <= float(x) <= 1.0 for x in shares) or sum(shares) > 1.0:
            raise ValueError("recall quotas: each share in [0, 1], together at most 1")
        if int(self.recent_categories) < 0:
            raise ValueError("recall quotas: recent_categories must be >= 0")

    @classmethod
    def from_dict(cls, data: Mapping[str, float] | None) -> ChannelQuotas:
        if not data:
            return cls()
        unknown = set(data) - {"category", "high_value", "new", "recent_categories"}
        if unknown:
            raise ValueError(f"recall quotas: unknown channels {sorted(unknown)}")
        return cls(**{k: (int(v) if k == "recent_categories" else float(v))
                      for k, v in data.items()})

    def counts(self, k: int) -> tuple[int, int, int]:
        """(category, high_value, new) candidate counts for a request of K."""
        return (int(k * self.category), int(k * self.high_value), int(k * self.new))


def channel_query(hist: Mapping[str, object], quotas: Mapping[str, float] | None
                  ) -> dict[str, object]:
    """RecallQuery fields for the channels, from a stage request's history and quotas."""
    parsed = ChannelQuotas.from_dict(quotas)
    return {"quotas": parsed if quotas else None,
            "categories": recent_categories(hist, parsed.recent_categories)}


def recent_categories(hist: Mapping[str, object], limit: int) -> np.ndarray:
    """The user's most recent distinct categories (newest first, padding dropped), from the
    behaviour columns of a stage request."""
    column = hist.get(HIST_CATEGORY)
    if column is None or limit <= 0:
        return np.empty(0, np.int64)
    values = column.values() if hasattr(column, "values") else column
    cats = np.asarray(values, dtype=np.int64).reshape(-1)
    cats = cats[cats > 0]
    if cats.size == 0:
        return cats
    _, first = np.unique(cats, return_index=True)
    return cats[np.sort(first)][:limit]


class UnknownAdError(KeyError):
    """An ad id the retrieval catalog does not hold."""


@dataclass(frozen=True)
class RecallQuery:
    """One retrieval request, in numpy terms. `user_vector=None` means unknown/cold user."""

    scene: str
    user_vector: np.ndarray | None = None
    k: int = DEFAULT_K
    exclude_ad_ids: np.ndarray | None = None  # e.g. frequency-capped or budget-spent ads
    include_paused: bool = False
    ignore_scene_targeting: bool = False
    categories: np.ndarray | None = None  # the user's recent categories, newest first
    quotas: ChannelQuotas | None = None  # None: the Recall's defaults


@dataclass(frozen=True)
class RecallResult:
    """Ad ids best first (never -1), their scores, and which channel produced them."""

    ad_ids: np.ndarray  # int64
    scores: np.ndarray  # float32: inner product (vector) or cold-start eCPM estimate
    channel: str
    eligible: int  # eligible ads for this request: the most that could come back
    searches: int = 1  # faiss calls made (over-fetch rounds), for telemetry
    channels: np.ndarray | None = None  # int8 codes into CHANNELS; None: all `channel`
    rows: np.ndarray | None = None  # the ads' catalog rows, when the search had them

    def channel_codes(self) -> np.ndarray:
        """Per-candidate channel codes (filled from `channel` for a one-channel result)."""
        if self.channels is not None:
            return self.channels
        return np.full(self.ad_ids.size, CODE[self.channel], dtype=np.int8)

    def wire_channels(self) -> dict[str, object]:
        """The wire's per-candidate channel fields (RecallResponse.channels/channel_names)."""
        return {"channels": self.channel_codes().astype(np.int64),
                "channel_names": list(CHANNELS)}

    def channel_names(self) -> np.ndarray:
        """Per-candidate channel names (for debug output and funnel figures)."""
        return np.asarray(CHANNELS, dtype=object)[self.channel_codes()]


@dataclass
class AdCatalog:
    """Eligibility per ad, row-aligned with `ad_ids`. Built from the bundle's catalog table.

    `active` and the scene masks are mutated in place by pauses (under the writer lock); adding
    an ad builds a new AdCatalog so concurrent readers keep consistent arrays.
    """

    ad_ids: np.ndarray  # int64 [N]
    active: np.ndarray  # bool [N]
    scene_mask: dict[str, np.ndarray]  # scene -> bool [N]: the ad targets the scene
    cold_score: np.ndarray  # float32 [N]: Qscore-based eCPM estimate (cold-start ranking)
    category: np.ndarray | None = None  # int64 [N] category id (0: unknown), category channel
    ids: IdIndex = field(init=False)

    def __post_init__(self) -> None:
        self.ids = IdIndex(self.ad_ids)
        if self.category is None:
            self.category = np.zeros(self.ad_ids.size, dtype=np.int64)
        if self.category.shape != self.ad_ids.shape:
            raise ValueError("categories are not aligned with the ad ids")

    @classmethod
    def build(cls, ad_ids: np.ndarray, scenes: Iterable[Iterable[str]],
              statuses: Iterable[str], cold_score: np.ndarray | None = None) -> AdCatalog:
        ad_ids = np.ascontiguousarray(ad_ids, dtype=np.int64)
        scene_lists = [list(s) for s in scenes]
        status_list = list(statuses)
        if not (len(scene_lists) == len(status_list) == ad_ids.size):
            raise ValueError("catalog columns have different lengths")
        for status in set(status_list) - set(STATUSES):
            raise ValueError(f"unknown ad status {status!r}; expected one of {STATUSES}")
        if ad_ids.size and (ad_ids < 0).any():
            raise ValueError("ad ids must be >= 0")
        if np.unique(ad_ids).size != ad_ids.size:
            raise ValueError("ad ids are not unique")
        names = sorted({s for lst in scene_lists for s in lst})
        masks = {s: np.zeros(ad_ids.size, dtype=bool) for s in names}
        for row, lst in enumerate(scene_lists):
            for s in lst:
                masks[s][row] = True
        score = (np.zeros(ad_ids.size, dtype=np.float32) if cold_score is None
                 else np.asarray(cold_score, dtype=np.float32).copy())
        if score.shape != ad_ids.shape:
            raise ValueError("cold-start scores are not aligned with the ad ids")
        return cls(ad_ids, np.array([s == ACTIVE for s in status_list], dtype=bool), masks, score)

    def eligible_at(self, rows: np.ndarray, query: RecallQuery) -> np.ndarray:
        """Eligibility of the given rows only: cheap for the few thousand faiss returned."""
        keep = np.ones(rows.size, dtype=bool) if query.include_paused else self.active[rows]
        if not query.ignore_scene_targeting:
            scene = self.scene_mask.get(query.scene)
            if scene is None:
                return np.zeros(rows.size, dtype=bool)
            keep &= scene[rows]
        if query.exclude_ad_ids is not None and len(query.exclude_ad_ids):
            keep &= ~np.isin(self.ad_ids[rows], query.exclude_ad_ids)
        return keep

    def base_mask(self, query: RecallQuery) -> np.ndarray | None:
        """Status+scene mask over all rows (None = everything); exclusions not applied."""
        mask = None if query.include_paused else self.active
        if not query.ignore_scene_targeting:
            scene = self.scene_mask.get(query.scene)
            if scene is None:
                return np.zeros(self.ad_ids.size, dtype=bool)
            mask = scene if mask is None else mask & scene
        return mask

    def appended(self, ad_id: int, scenes: Iterable[str], status: str,
                 cold_score: float, category: int = 0) -> AdCatalog:
        """A new catalog with one more ad (copy-on-write: readers keep the old arrays)."""
        n = self.ad_ids.size
        masks = {s: np.append(m, False) for s, m in self.scene_mask.items()}
        for s in scenes:
            masks.setdefault(s, np.zeros(n + 1, dtype=bool))[n] = True
        return AdCatalog(np.append(self.ad_ids, np.int64(ad_id)),
                         np.append(self.active, status == ACTIVE), masks,
                         np.append(self.cold_score, np.float32(cold_score)),
                         np.append(self.category, np.int64(category)))

    def with_categories(self, ad_ids: np.ndarray, categories: np.ndarray) -> AdCatalog:
        """A copy whose category column is filled from (ad id, category) pairs."""
        category = np.zeros(self.ad_ids.size, dtype=np.int64)
        rows = self.ids.rows(np.asarray(ad_ids, dtype=np.int64))
        known = rows >= 0
        category[rows[known]] = np.asarray(categories, dtype=np.int64)[known]
        return AdCatalog(self.ad_ids, self.active, self.scene_mask, self.cold_score, category)


class Recall:
    """Top-K eligible ads for a user vector (or the cold-start channel without one)."""

    def __init__(self, index: faiss.Index, catalog: AdCatalog, *, tuned_k: int | None = None,
                 overfetch: float = FETCH_MARGIN, value: ValueTerm | None = None,
                 quotas: ChannelQuotas | None = None):
        """`index` holds ad ids, each of which must be in `catalog`.

        `tuned_k`: the K the index's nprobe was tuned for (IndexSpec.k). A filtered search for
        K eligible ads must find the top K/share of ALL ads, which needs proportionally more
        lists; nprobe is scaled by fetch / tuned_k so filtered recall matches the tuned recall.
        `value`: the term a value-aware index was built with (IndexSpec.value); None: cosine.
        `quotas`: the channels' default shares of K (a query may bring its own).
        """
        if index.ntotal != catalog.ad_ids.size:
            raise ValueError(f"index holds {index.ntotal} ads, the catalog {catalog.ad_ids.size}")
        self._index = index
        self._nlist, self._nprobe = index_nprobe(index)
        self._value = value
        self._index_dim = int(index.d)
        self._dim = self._index_dim - (1 if value is not None else 0)  # the ad-tower dim
        self._fresh: faiss.Index | None = None  # ads added since the bundle; exact, copy-on-write
        self._catalog = catalog
        self._overfetch = overfetch
        self._tuned_k = tuned_k
        self._quotas = quotas or ChannelQuotas()
        self._n_bundle = int(catalog.ad_ids.size)  # rows from here on are ads added since
        self._write_lock = threading.Lock()
        self._marks = threading.local()  # per-thread row marks for `_merge`'s duplicates
        # Derived per-scene data (eligible counts, cold-start order), dropped on every write.
        self._cache: dict[tuple[str, str, bool, bool], object] = {}

    @property
    def size(self) -> int:
        return int(self._catalog.ad_ids.size)

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def value(self) -> ValueTerm | None:
        return self._value

    def value_of(self, ad_ids: np.ndarray) -> np.ndarray:
        """Each ad's value as a value-aware index scores it (its cold-start eCPM estimate);
        0 for ids the catalog does not know."""
        catalog = self._catalog
        rows = catalog.ids.rows(np.asarray(ad_ids, dtype=np.int64))
        return np.where(rows >= 0, catalog.cold_score[np.maximum(rows, 0)], 0.0)

    @property
    def nprobe(self) -> int:
        return self._nprobe

    def eligible(self, ad_ids: np.ndarray, query: RecallQuery) -> np.ndarray:
        """Whether each ad may be recalled for `query` (unknown ids: False); what an exact
        reference filters by, so recall is measured against the ads retrieval could return."""
        catalog = self._catalog
        rows = catalog.ids.rows(np.asarray(ad_ids, dtype=np.int64))
        known = rows >= 0
        keep = np.zeros(rows.size, dtype=bool)
        keep[known] = catalog.eligible_at(rows[known], query)
        return keep

    def recall(self, query: RecallQuery) -> RecallResult:
        """Eligible ads best first; never -1, never ineligible, K met whenever possible."""
        catalog, fresh, cache = self._catalog, self._fresh, self._cache  # one snapshot per call
        channel = CHANNEL_COLD if query.user_vector is None else CHANNEL_VECTOR
        n_eligible = self._eligible_count(catalog, cache, query)
        k = max(0, min(int(query.k), n_eligible))
        if k == 0:
            return RecallResult(np.empty(0, np.int64), np.empty(0, np.float32), channel,
                                n_eligible, 0)
        if query.user_vector is None:
            return self._cold_start(catalog, cache, query, k, n_eligible)
        vector = np.asarray(query.user_vector, dtype=np.float32).reshape(1, -1)
        if vector.shape[1] != self._dim:
            raise ValueError(f"user_vector has {vector.shape[1]} dims, the index {self._dim}")
        vector = augment_queries(vector) if self._value is not None else normalize(vector)
        ann = self._search(vector, catalog, fresh, query, k, n_eligible)
        return self._merge(ann, catalog, cache, query, k)

    def set_categories(self, ad_ids: np.ndarray, categories: np.ndarray) -> None:
        """Fill the category column (the catalog table's `category_id`) for the category
        channel; ads not listed keep category 0 (never recalled by it)."""
        with self._write_lock:
            self._catalog = self._catalog.with_categories(ad_ids, categories)
            self._cache = {}

    # ---- channels -------------------------------------------------------------------------

    def _merge(self, ann: RecallResult, catalog: AdCatalog, cache: dict, query: RecallQuery,
               k: int) -> RecallResult:
        """The ANN's head, then each channel's quota, then the ANN's tail; first channel wins
        a duplicate; K at most. Columnar: a handful of concatenations per request."""
        quotas = query.quotas or self._quotas
        n_cat, n_val, n_new = quotas.counts(k)
        cats = query.categories
        if cats is None or not cats.size or not quotas.recent_categories:
            n_cat = 0
        if n_new and catalog.ad_ids.size <= self._n_bundle:
            n_new = 0
        if not (n_cat or n_val or n_new):
            return ann
        head = max(0, k - n_cat - n_val - n_new)
        ann_rows = catalog.ids.rows(ann.ad_ids) if ann.rows is None else ann.rows
        parts = [(ann_rows[:head], ann.scores[:head], CHANNEL_VECTOR)]
        if n_cat:
            rows = self._category_rows(catalog, cache, query,
                                       cats[:quotas.recent_categories], n_cat)
            parts.append((rows, catalog.cold_score[rows], CHANNEL_CATEGORY))
        if n_val:
            rows = self._walk(self._value_order(catalog, cache, query), catalog, query, n_val)
            parts.append((rows, catalog.cold_score[rows], CHANNEL_VALUE))
        if n_new:
            rows = self._new_rows(catalog, query, n_new)
            parts.append((rows, catalog.cold_score[rows], CHANNEL_NEW))
        parts.append((ann_rows[head:], ann.scores[head:], CHANNEL_VECTOR))
        parts = self._first_seen(catalog.ad_ids.size, parts, k)
        rows = np.concatenate([p[0] for p in parts])
        scores = np.concatenate([p[1] for p in parts]).astype(np.float32)
        codes = np.concatenate([np.full(p[0].size, CODE[p[2]], np.int8) for p in parts])
        return RecallResult(catalog.ad_ids[rows], scores, CHANNEL_VECTOR, ann.eligible,
                            ann.searches, codes, rows)

    def _first_seen(self, n_rows: int, parts: list[tuple[np.ndarray, np.ndarray, str]],
                    k: int) -> list[tuple[np.ndarray, np.ndarray, str]]:
        """Each part less the rows an earlier part holds, K rows at most in all. Every part is
        duplicate-free on its own, so a per-thread mark per catalog row finds the repeats in a
        few vector passes (np.unique over all ids sorted them: ~3x slower); the marks are
        cleared before returning."""
        seen = getattr(self._marks, "seen", None)
        if seen is None or seen.size < n_rows:
            seen = self._marks.seen = np.zeros(max(n_rows, 1), dtype=bool)
        out, left = [], k
        try:
            for rows, scores, channel in parts:
                if left <= 0:
                    break
                new = ~seen[rows]
                rows, scores = rows[new][:left], scores[new][:left]
                seen[rows] = True
                out.append((rows, scores, channel))
                left -= rows.size
        finally:
            for rows, _, _ in out:
                seen[rows] = False
        return out

    def _value_order(self, catalog: AdCatalog, cache: dict, query: RecallQuery) -> np.ndarray:
        """Rows passing status + scene, best Qscore eCPM first (cached per scene)."""
        key = ("cold", query.scene, query.include_paused, query.ignore_scene_targeting)
        order = cache.get(key)
        if order is None:
            mask = catalog.base_mask(query)
            rows = np.arange(catalog.ad_ids.size) if mask is None else np.flatnonzero(mask)
            order = rows[np.lexsort((catalog.ad_ids[rows], -catalog.cold_score[rows]))]
            cache[key] = order
        return order

    def _category_lists(self, catalog: AdCatalog, cache: dict, query: RecallQuery
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-category top lists in CSR form, cached per scene: (order, ranks, cats).

        `order` is `_value_order` (rows passing status + scene, best Qscore eCPM first, ties
        by ad id), so a row's position in it, its rank, orders rows exactly as (eCPM desc,
        ad id asc) with no ties. `ranks` groups those positions by category (ascending within
        each) and `cats` is the category of each: a request slices the heads it needs, and
        picking the best of several categories is a partition of distinct integers."""
        key = ("category", query.scene, query.include_paused, query.ignore_scene_targeting)
        lists = cache.get(key)
        if lists is None:
            order = self._value_order(catalog, cache, query)
            ranks = np.argsort(catalog.category[order], kind="stable")
            lists = (order, ranks, catalog.category[order[ranks]])
            cache[key] = lists
        return lists

    def _category_rows(self, catalog: AdCatalog, cache: dict, query: RecallQuery,
                       categories: np.ndarray, n: int) -> np.ndarray:
        """The best `n` eligible ads by Qscore eCPM over the user's recent categories, ties
        by ad id.

        The lists hold only ads that passed status and scene when they were cached, so
        without exclusions the best n over the union lie in the categories' first n ranks: a
        request reads those heads (up to 10 x n), keeps the n smallest ranks and re-checks
        just those rows (an ad paused since the lists were cached). With exclusions, or when
        that check fails, the heads are read 2n deep and screened: when n of the 2n best
        are eligible, the top n eligible rows overall are among them (any eligible row ranked
        below has n eligible rows above it); otherwise the whole union is screened."""
        order, ranks, cats = self._category_lists(catalog, cache, query)
        excluding = query.exclude_ad_ids is not None and len(query.exclude_ad_ids)
        if not excluding:
            rows = order[_smallest(_heads(ranks, cats, categories, n), n)]
            if catalog.eligible_at(rows, query).all():
                return rows
        union = _heads(ranks, cats, categories, 2 * n)
        rows = order[_smallest(union, 2 * n)]
        ok = catalog.eligible_at(rows, query)
        if np.count_nonzero(ok) < n:
            rows = order[np.sort(union)]
            ok = catalog.eligible_at(rows, query)
        return rows[ok][:n]

    def _new_rows(self, catalog: AdCatalog, query: RecallQuery, n: int) -> np.ndarray:
        """Eligible ads added since the bundle, best Qscore eCPM first."""
        rows = np.arange(self._n_bundle, catalog.ad_ids.size)
        rows = rows[catalog.eligible_at(rows, query)]
        return rows[np.lexsort((catalog.ad_ids[rows], -catalog.cold_score[rows]))[:n]]

    @staticmethod
    def _walk(order: np.ndarray, catalog: AdCatalog, query: RecallQuery, k: int) -> np.ndarray:
        """The first k rows of `order` still eligible (statuses may have changed since the
        order was cached), checked in growing chunks."""
        picked: list[np.ndarray] = []
        have, start, chunk = 0, 0, 2 * k + 64
        while have < k and start < order.size:
            rows = order[start:start + chunk]
            rows = rows[catalog.eligible_at(rows, query)]
            picked.append(rows)
            have += rows.size
            start += chunk
            chunk *= 2
        return np.concatenate(picked)[:k] if picked else np.empty(0, np.int64)

    def _eligible_count(self, catalog: AdCatalog, cache: dict, query: RecallQuery) -> int:
        key = ("count", query.scene, query.include_paused, query.ignore_scene_targeting)
        count = cache.get(key)
        if count is None:
            mask = catalog.base_mask(query)
            count = catalog.ad_ids.size if mask is None else int(mask.sum())
            cache[key] = count
        if query.exclude_ad_ids is not None and len(query.exclude_ad_ids):
            rows = [r for r in map(catalog.ids.get, np.asarray(query.exclude_ad_ids).tolist())
                    if r is not None]
            if rows:
                mask = catalog.base_mask(query)
                rows_arr = np.unique(np.asarray(rows, dtype=np.int64))
                count -= rows_arr.size if mask is None else int(mask[rows_arr].sum())
        return int(count)

    def _search(self, vector: np.ndarray, catalog: AdCatalog, fresh: faiss.Index | None,
                query: RecallQuery, k: int, n_eligible: int) -> RecallResult:
        total = catalog.ad_ids.size
        fetch = fetch_for(k, total, n_eligible, self._overfetch)
        nprobe = self._nprobe
        depth = probe_depth(k, total, n_eligible)
        if self._nlist and self._tuned_k and depth > self._tuned_k:
            nprobe = min(self._nlist, int(math.ceil(nprobe * depth / self._tuned_k)))
        searches = 0
        while True:
            searches += 1
            scores, ids = self._search_once(vector, fetch, nprobe, fresh)
            returned = ids >= 0  # faiss pads with -1 when the probed lists run dry
            ids, scores = ids[returned], scores[returned]
            rows = catalog.ids.rows(ids)
            keep = catalog.eligible_at(rows, query)
            if int(keep.sum()) >= k:
                break
            exhausted_fetch = fetch >= total
            exhausted_probe = self._nlist == 0 or nprobe >= self._nlist
            if exhausted_fetch and exhausted_probe:
                break
            if not exhausted_probe and (ids.size < fetch or exhausted_fetch):
                # too few lists probed: widen in proportion to the shortfall (at least double)
                grow = max(2.0, fetch / max(ids.size, 1))
                nprobe = min(self._nlist, int(math.ceil(nprobe * grow)))
            else:
                fetch = min(total, fetch * 2)
        ids, scores = ids[keep][:k], scores[keep][:k]  # best first (see `_search_once`)
        return RecallResult(ids.astype(np.int64), scores.astype(np.float32),
                            CHANNEL_VECTOR, n_eligible, searches, rows=rows[keep][:k])

    def _search_once(self, vector: np.ndarray, fetch: int, nprobe: int,
                     fresh: faiss.Index | None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) best first: faiss returns each index's results sorted (its -1
        padding last, with the lowest score), so only a fresh side index needs a merge."""
        params = faiss.SearchParametersIVF(nprobe=nprobe) if self._nlist else None
        scores, ids = self._index.search(vector, min(fetch, self._index.ntotal), params=params)
        scores, ids = scores[0], ids[0]
        if fresh is not None and fresh.ntotal:
            f_scores, f_ids = fresh.search(vector, min(fetch, fresh.ntotal))
            scores = np.concatenate([scores, f_scores[0]])
            ids = np.concatenate([ids, f_ids[0]])
            order = np.argsort(-scores, kind="stable")
            scores, ids = scores[order], ids[order]
        return scores, ids

    def _cold_start(self, catalog: AdCatalog, cache: dict, query: RecallQuery, k: int,
                    n_eligible: int) -> RecallResult:
        """Top cold-start scores among eligible ads: a cached per-scene order, walked in chunks."""
        rows = self._walk(self._value_order(catalog, cache, query), catalog, query, k)
        return RecallResult(catalog.ad_ids[rows], catalog.cold_score[rows].astype(np.float32),
                            CHANNEL_COLD, n_eligible, 0)

    # ---- catalog updates without a rebuild ----------------------------------------------------

    def add_ad(self, ad_id: int, vector: np.ndarray | None, scenes: Iterable[str],
               status: str = ACTIVE, cold_score: float = 0.0) -> bool:
        """Serve a new ad right away; True if it was new. `vector` comes from the ad tower (the
        caller computes it) and is required for a new ad.

        Re-adding a known ad updates its scenes, status and score but not its vector (a changed
        creative gets its new vector with the next bundle).
        """
        ad_id = int(ad_id)
        if status not in STATUSES:
            raise ValueError(f"unknown ad status {status!r}; expected one of {STATUSES}")
        if ad_id < 0:
            raise ValueError("ad ids must be >= 0")
        scenes = list(scenes)
        vec = None
        if vector is not None:
            vec = np.asarray(vector, dtype=np.float32).reshape(1, -1)
            if vec.shape[1] != self._dim:
                raise ValueError(f"ad vector has {vec.shape[1]} dims, the index {self._dim}")
            if not np.isfinite(vec).all():
                raise ValueError("ad vector has non-finite values")
            vec = (self._value.augment(vec, cold_score) if self._value is not None
                   else normalize(vec))
        with self._write_lock:
            catalog = self._catalog
            if catalog.ids.get(ad_id) is not None:
                self._update_in_place(catalog, ad_id, scenes, status, cold_score)
                return False
            if vec is None:
                raise ValueError(f"ad {ad_id} is new: its ad-tower vector is required")
            fresh = (faiss.IndexIDMap2(faiss.IndexFlatIP(self._index_dim)) if self._fresh is None
                     else faiss.clone_index(self._fresh))
            fresh.add_with_ids(vec, np.array([ad_id], dtype=np.int64))
            # Catalog first: a search that sees the new fresh index must find the id's row.
            self._catalog = catalog.appended(ad_id, scenes, status, cold_score)
            self._fresh = fresh
            self._cache = {}
            return True

    def _update_in_place(self, catalog: AdCatalog, ad_id: int, scenes: list[str], status: str,
                         cold_score: float) -> None:
        row = catalog.ids.get(ad_id)
        masks = {s: m.copy() for s, m in catalog.scene_mask.items()}
        for s in scenes:
            masks.setdefault(s, np.zeros(catalog.ad_ids.size, dtype=bool))
        for s, mask in masks.items():
            mask[row] = s in scenes
        score = catalog.cold_score.copy()
        score[row] = cold_score
        active = catalog.active.copy()
        active[row] = status == ACTIVE
        self._catalog = AdCatalog(catalog.ad_ids, active, masks, score, catalog.category)
        self._cache = {}

    def set_status(self, ad_id: int, status: str) -> None:
        """Pause (or re-activate) an ad; it stops (or starts) coming back from the next search."""
        if status not in STATUSES:
            raise ValueError(f"unknown ad status {status!r}; expected one of {STATUSES}")
        with self._write_lock:
            row = self._catalog.ids.get(int(ad_id))
            if row is None:
                raise UnknownAdError(f"unknown ad_id {ad_id}")
            self._catalog.active[row] = status == ACTIVE
            self._cache = {}

    def set_cold_start_scores(self, scores: Mapping[int, float]) -> int:
        """Refresh the cold-start ranking (Qscore eCPM estimates); unknown ids are skipped."""
        with self._write_lock:
            catalog = self._catalog
            new = catalog.cold_score.copy()
            updated = 0
            for ad_id, score in scores.items():
                row = catalog.ids.get(int(ad_id))
                if row is not None:
                    new[row] = score
                    updated += 1
            self._catalog = AdCatalog(catalog.ad_ids, catalog.active, catalog.scene_mask, new,
                                      catalog.category)
            self._cache = {}
            return updated

    def status_of(self, ad_id: int) -> str:
        row = self._catalog.ids.get(int(ad_id))
        if row is None:
            raise UnknownAdError(f"unknown ad_id {ad_id}")
        return ACTIVE if self._catalog.active[row] else PAUSED


def _heads(ranks: np.ndarray, cats: np.ndarray, categories: np.ndarray,
           depth: int) -> np.ndarray:
    """The first `depth` ranks of each requested category's list, concatenated."""
    lo = np.searchsorted(cats, categories, side="left")
    hi = np.minimum(np.searchsorted(cats, categories, side="right"), lo + depth)
    return np.concatenate([ranks[a:b] for a, b in zip(lo.tolist(), hi.tolist(), strict=True)])


def _smallest(values: np.ndarray, n: int) -> np.ndarray:
    """The n smallest of distinct integers, ascending."""
    if values.size > n:
        values = np.partition(values, n - 1)[:n]
    return np.sort(values)
