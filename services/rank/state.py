"""The ranking stage's state: a `Ranker` loaded from a bundle, and its wire methods.

Bundle files read: `din_esmm.safetensors` (+ its config in the manifest) and `catalog.parquet`
(the ad features, encoded once at load).

`handle(RankRequest) -> RankResponse` is what both the HTTP app and the gateway's in-process
client call. With a `MicroBatcher`, the request is encoded on the caller's thread and its model
work joins a batch; without one it runs right there.
"""

from __future__ import annotations

from dataclasses import dataclass

from models.bundle import read_bundle
from services.common import wire
from services.common.deadline import Deadline, DeadlineExceeded
from services.rank.batcher import MicroBatcher, Timed
from services.rank.ranker import Prepared, Ranker, RankQuery, RankScores


@dataclass
class RankState:
    """One loaded bundle's ranker."""

    version: str
    ranker: Ranker

    def query(self, request: wire.RankRequest) -> RankQuery:
        return RankQuery(ad_ids=request.ad_ids, scene=request.scene, user=request.user,
                         hist=request.hist, context=request.context,
                         ad_features=request.ad_features or None)

    def score(self, request: wire.RankRequest, deadline: Deadline | None = None,
              batcher: MicroBatcher | None = None) -> Timed[RankScores]:
        """Scores plus queue/compute time (queue is 0 without a batcher)."""
        if deadline is not None:
            deadline.check("ranking")
        prepared = self.ranker.prepare(self.query(request))
        if batcher is None or prepared.ad_ids.size == 0:
            return Timed(self.ranker.score(prepared), 0.0, 0.0, prepared.ad_ids.size)
        future = batcher.submit((self.ranker, prepared), prepared.ad_ids.size)
        timeout = None if deadline is None else deadline.remaining_s()
        try:
            return future.result(timeout=None if timeout == float("inf") else timeout)
        except TimeoutError:
            future.cancel()
            raise DeadlineExceeded("deadline exceeded while batched") from None

    def handle(self, request: wire.RankRequest, deadline: Deadline | None = None,
               batcher: MicroBatcher | None = None) -> wire.RankResponse:
        scores = self.score(request, deadline, batcher).value
        return wire.RankResponse(ad_ids=scores.ad_ids, pctr=scores.pctr, pcvr=scores.pcvr,
                                 pctcvr=scores.pctcvr,
                                 info=wire.StageInfo(model_version=self.version))

    def update(self, update: wire.CatalogUpdate) -> wire.CatalogUpdateResponse:
        """A new ad's features (a status-only change of a known ad needs nothing here)."""
        known = self.ranker.ads.row(update.ad_id) is not None
        if not update.features:
            if not known:
                raise ValueError(f"ad {update.ad_id} is new: its features are required "
                                 "(field 'features')")
            return wire.CatalogUpdateResponse(ad_id=update.ad_id, status=update.status)
        added = self.ranker.add_ad(update.ad_id, dict(update.features))
        return wire.CatalogUpdateResponse(ad_id=update.ad_id, status=update.status, added=added)


def run_batch(items: list[tuple[Ranker, Prepared]]) -> list[RankScores]:
    """The batcher's model call: requests grouped by ranker (a reload may put two bundles in
    one batch), each group in one `score_many`."""
    groups: dict[int, list[int]] = {}
    for i, (ranker, _) in enumerate(items):
        groups.setdefault(id(ranker), []).append(i)
    out: list[RankScores | None] = [None] * len(items)
    for positions in groups.values():
        ranker = items[positions[0]][0]
        for i, result in zip(positions, ranker.score_many([items[i][1] for i in positions]),
                             strict=True):
            out[i] = result
    return out  # type: ignore[return-value]


def load_rank_state(path: str, *, device: str | None = None, threads: int = 1,
                    amp: str = "bf16") -> RankState:
    """Load a bundle (version dir or BUNDLES root) into a ready RankState."""
    bundle = read_bundle(path)
    return RankState(version=bundle.version,
                     ranker=Ranker.from_bundle(bundle, device=device, threads=threads, amp=amp))
