"""Per-stage latency for the `cascade bench e2e` summary, from the services' /metrics.

Two scrapes (Prometheus text) are taken: just before the schedule starts and after the run.
Per-stage latency is the difference of the two scrapes' histogram buckets, so earlier traffic
and start-up do not count. Client-side figures come from loadtest/records.py.
"""

from __future__ import annotations

import math
import re
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field

# Per-stage latency histograms, in order of preference, each with a `stage` label:
# - cascade_gateway_stage_seconds (services/gateway/service.py; formerly
#   cascade_stage_latency_seconds): the gateway's time per cascade step as the gateway saw it
#   (features, recall, screen, prerank, rank, auction; remote calls include the network);
# - cascade_request_seconds: each serving app's own handling time (services/common/telemetry.py,
#   StageMetrics), scraped from the stage services too when their URLs are known.
STAGE_HISTOGRAMS = ("cascade_gateway_stage_seconds", "cascade_stage_latency_seconds",
                    "cascade_request_seconds")
STAGE_LABEL = "stage"

_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')


@dataclass
class Histogram:
    """One histogram series: cumulative bucket counts by upper bound (`le`), plus count/sum."""

    buckets: dict[float, float] = field(default_factory=dict)
    count: float = 0.0
    total: float = 0.0

    def minus(self, earlier: Histogram | None) -> Histogram:
        """The observations made after `earlier` (counters only grow between scrapes)."""
        if earlier is None:
            return Histogram(dict(self.buckets), self.count, self.total)
        return Histogram({le: n - earlier.buckets.get(le, 0.0) for le, n in self.buckets.items()},
                         self.count - earlier.count, self.total - earlier.total)

    def quantile(self, q: float) -> float:
        """Prometheus' `histogram_quantile`: linear interpolation inside the bucket holding q.

        NaN with no observations; the highest finite bound when q falls in the +Inf bucket.
        """
        bounds = sorted(self.buckets)
        if not bounds or self.buckets[bounds[-1]] <= 0:
            return math.nan
        rank = q * self.buckets[bounds[-1]]
        lower, below = 0.0, 0.0
        for upper in bounds:
            cumulative = self.buckets[upper]
            if cumulative >= rank:
                if math.isinf(upper):
                    return lower
                if cumulative == below:
                    return upper
                return lower + (upper - lower) * (rank - below) / (cumulative - below)
            lower, below = upper, cumulative
        return lower


def _unescape(value: str) -> str:
    return value.replace(r"\"", '"').replace(r"\n", "\n").replace("\\\\", "\\")


def parse_samples(text: str) -> Iterable[tuple[str, dict[str, str], float]]:
    """(name, labels, value) for every sample line of Prometheus text exposition format."""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if not match:
            continue
        labels = {k: _unescape(v) for k, v in _LABEL.findall(match.group("labels") or "")}
        try:
            value = float(match.group("value"))
        except ValueError:
            continue
        yield match.group("name"), labels, value


def parse_histograms(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], Histogram]]:
    """Every histogram in `text`: family name -> label set (without `le`) -> Histogram."""
    families: dict[str, dict[tuple[tuple[str, str], ...], Histogram]] = {}
    for name, labels, value in parse_samples(text):
        for suffix in ("_bucket", "_count", "_sum"):
            if name.endswith(suffix):
                family = name[: -len(suffix)]
                break
        else:
            continue
        key = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
        hist = families.setdefault(family, {}).setdefault(key, Histogram())
        if suffix == "_bucket" and "le" in labels:
            hist.buckets[float(labels["le"])] = value
        elif suffix == "_count":
            hist.count = value
        elif suffix == "_sum":
            hist.total = value
    return {f: series for f, series in families.items()
            if any(h.buckets for h in series.values())}


def _to_ms(family: str) -> float:
    return 1.0 if family.endswith(("_ms", "_milliseconds")) else 1000.0


def _family_quantiles(now: dict, then: dict, family: str, label: str) -> dict[str, dict]:
    merged: dict[str, Histogram] = {}
    for key, hist in now.get(family, {}).items():
        stage = dict(key).get(label)
        if stage is None:
            continue
        delta = hist.minus(then.get(family, {}).get(key))
        into = merged.setdefault(stage, Histogram())
        for le, n in delta.buckets.items():
            into.buckets[le] = into.buckets.get(le, 0.0) + n
        into.count += delta.count
        into.total += delta.total
    scale = _to_ms(family)
    return {stage: {"p50_ms": round(hist.quantile(0.50) * scale, 3),
                    "p99_ms": round(hist.quantile(0.99) * scale, 3),
                    "count": int(hist.count)}
            for stage, hist in merged.items() if hist.count > 0 or any(hist.buckets.values())}


def stage_quantiles(after: str, before: str | None = None,
                    families: tuple[str, ...] = STAGE_HISTOGRAMS,
                    label: str = STAGE_LABEL) -> dict[str, dict[str, float]]:
    """{stage: {p50_ms, p99_ms, count}} from the stage histograms' growth between two scrapes.

    A stage is taken from the first family in `families` that has it. If none of them is
    exported, the first histogram with a `label` label is used, so a renamed metric still
    reports. Series of one stage under other labels (endpoint, worker, instance) are summed.
    """
    now = parse_histograms(after)
    then = parse_histograms(before) if before else {}
    present = [f for f in families if f in now]
    if not present:
        present = [f for f, series in now.items() if any(label in dict(k) for k in series)][:1]
    out: dict[str, dict[str, float]] = {}
    for family in present:
        for stage, quantiles in _family_quantiles(now, then, family, label).items():
            out.setdefault(stage, quantiles)
    return out


def label_instance(text: str, instance: str) -> str:
    """Add `instance="..."` to every sample, so scrapes of several services can be joined."""
    escaped = instance.replace("\\", "\\\\").replace('"', '\\"')

    def add(line: str) -> str:
        match = _SAMPLE.match(line.strip())
        if not match or line.lstrip().startswith("#"):
            return line
        labels = match.group("labels")
        inner = f'instance="{escaped}"' + (f",{labels}" if labels else "")
        return f"{match.group('name')}{{{inner}}} {match.group('value')}"

    return "\n".join(add(line) for line in text.splitlines()) + "\n"


def scrape_all(urls: Iterable[str], api_key: str = "", timeout: float = 5.0) -> str:
    """Several services' /metrics joined into one text, each sample labelled by its URL."""
    return "".join(label_instance(scrape_metrics(u, api_key, timeout), u) for u in urls)


def scrape_metrics(url: str, api_key: str = "", timeout: float = 5.0) -> str:
    """A service's Prometheus text ('' if it does not answer: stages then go unreported)."""
    request = urllib.request.Request(url.rstrip("/") + "/metrics", headers={"X-API-Key": api_key})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read().decode()
    except OSError:
        return ""
