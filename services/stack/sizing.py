"""Capacity planning for the Kubernetes manifests, from the CPU per request measured here.

Every input is a figure the README reports from a command (`cascade bench e2e` embedded and
stack runs, the per-step CPU of the in-process cascade); this module only does the arithmetic,
so the manifests' CPU requests, the HPA target and the README's sizing table come from one
place (tests/test_k8s.py checks that they agree).

The split of the stack's CPU over the four services is a model, written down here:
- a step's own work costs the same in any process: features, screening and the auction run in
  the gateway; recall, pre-rank and rank in their stage service;
- the embedded server's CPU beyond the steps' sum is the gateway's HTTP/JSON/asyncio work for
  the public request (the embedded run has no other HTTP);
- the stack's CPU beyond the embedded server's is the three internal hops, split evenly, half
  on the gateway's client side and half on the stage's server side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Measured (README "Stage latency" / "End-to-end load", 1M ads, 2 cores): ms of CPU per request.
STEP_CPU_MS = {"features": 1.0, "recall": 1.8, "screen": 1.15, "prerank": 0.68, "rank": 2.27,
               "auction": 0.26}
EMBEDDED_CPU_MS = 10.733  # cascade serve all, 2 pre-forked workers (cpu_ms_per_request)
STACK_CPU_MS = 18.556  # cascade stack: gateway + three stage services over HTTP

GATEWAY_STEPS = ("features", "screen", "auction")
STAGE_STEPS = {"retrieval": "recall", "prerank": "prerank", "rank": "rank"}
HOPS = len(STAGE_STEPS)

TARGET_UTILIZATION = 0.6  # HPA target: headroom for bursts and p99 (queueing grows past ~70%)
POD_CPU = {"gateway": 2, "retrieval": 1, "prerank": 1, "rank": 1}  # cores per pod
MIN_PODS = 2  # a PodDisruptionBudget of 1 needs a second pod to drain a node
RATES = (250, 1_000, 10_000)


def cpu_ms_per_request() -> dict[str, float]:
    """Each service's CPU per ad request in the distributed stack (the model above)."""
    steps = sum(STEP_CPU_MS.values())
    public_http = EMBEDDED_CPU_MS - steps
    hop_side = (STACK_CPU_MS - EMBEDDED_CPU_MS) / HOPS / 2
    out = {"gateway": public_http + sum(STEP_CPU_MS[s] for s in GATEWAY_STEPS) + HOPS * hop_side}
    out.update({name: STEP_CPU_MS[step] + hop_side for name, step in STAGE_STEPS.items()})
    return out


@dataclass(frozen=True)
class Sizing:
    """One service at one rate: busy cores, pods of `POD_CPU` cores at the target, cores asked."""

    service: str
    rps: int
    cpu_ms: float
    busy_cores: float
    pods: int
    requested_cores: int


def size(rps: int) -> list[Sizing]:
    rows = []
    for service, cpu_ms in cpu_ms_per_request().items():
        busy = rps * cpu_ms / 1000.0
        pods = max(MIN_PODS, math.ceil(busy / TARGET_UTILIZATION / POD_CPU[service]))
        rows.append(Sizing(service, rps, round(cpu_ms, 2), round(busy, 2), pods,
                           pods * POD_CPU[service]))
    return rows


def pod_capacity_rps(service: str) -> float:
    """Ad requests per second one pod serves at the HPA target."""
    return POD_CPU[service] * TARGET_UTILIZATION * 1000.0 / cpu_ms_per_request()[service]


def markdown_table(rates: tuple[int, ...] = RATES) -> str:
    """The README's sizing table."""
    lines = ["| rps | " + " | ".join(f"{s} pods (cores)" for s in POD_CPU) + " | total cores |",
             "|---:|" + "---:|" * (len(POD_CPU) + 1)]
    for rps in rates:
        rows = size(rps)
        cells = [f"{r.pods} ({r.requested_cores})" for r in rows]
        lines.append(f"| {rps:,} | " + " | ".join(cells)
                     + f" | {sum(r.requested_cores for r in rows)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    for name, ms in cpu_ms_per_request().items():
        print(f"{name:<10} {ms:6.2f} ms CPU/request, {pod_capacity_rps(name):6.1f} rps per pod "
              f"at {TARGET_UTILIZATION:.0%} of {POD_CPU[name]} core(s)")
    print(markdown_table())
