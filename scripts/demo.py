"""`make demo`: simulate a marketplace, train every model, serve the whole cascade in one
process, send a few hundred real HTTP requests and print what the cascade did.

Each step is skipped when its output already exists, so a second `make demo` goes straight to
serving. Everything runs on the CPU in well under 15 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table

console = Console()
CASCADE = [sys.executable, "-m", "cli.main"]


def step(title: str) -> None:
    console.rule(f"[bold]{title}")


def run(args: list[str], env: dict[str, str] | None = None) -> None:
    console.print(f"$ cascade {' '.join(args)}", style="dim")
    subprocess.run(CASCADE + args, check=True, env=env)


def offline_env() -> dict[str, str]:
    """Training and evaluation are offline and may use every core (the Makefile pins serving
    to one OpenMP thread per worker, which would leave a core idle while the models train)."""
    return {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 1)}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"demo: the server exited with code {proc.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"demo: the server was not ready after {timeout_s:.0f} s")


def sample_requests(data: Path, n: int, seed: int) -> list[dict]:
    """Real users with Zipf-like popularity, a scene mix and context, as a frontend would."""
    users = pq.read_table(data / "users.parquet", columns=["user_id"]).column(0).to_numpy()
    rng = np.random.default_rng(seed)
    ranks = np.minimum(rng.zipf(1.3, n) - 1, len(users) - 1)
    scenes = rng.choice(["home_feed", "search", "product_detail"], n, p=[0.6, 0.25, 0.15])
    slots = {"home_feed": 4, "search": 3, "product_detail": 2}
    reqs = []
    for i in range(n):
        user = int(users[ranks[i]]) if i % 20 else 10_000_000 + i  # every 20th: an unknown user
        reqs.append({"request_id": f"demo-{i}", "user_id": str(user), "scene": str(scenes[i]),
                     "slots": slots[str(scenes[i])],
                     "context": {"device": str(rng.choice(["ios", "android", "web"])),
                                 "hour": int(rng.integers(0, 24))}})
    return reqs


def show_response(resp: dict) -> None:
    table = Table(title=f"request {resp['request_id']}", show_lines=False)
    for col in ("slot", "ad", "campaign", "price/click", "pCTR", "pCVR", "eCPM"):
        table.add_column(col, justify="right")
    for s in resp["slots"]:
        table.add_row(str(s.get("position", "")), str(s["ad_id"]), str(s["campaign_id"]),
                      f"{s['price_micros'] / 1e6:.4f}", f"{s['pctr']:.4f}", f"{s['pcvr']:.4f}",
                      f"{s['ecpm'] / 1e6:.4f}")
    console.print(table)
    stages = "  ".join(f"{st['name']} {st['count_in']}->{st['count_out']} {st['ms']:.1f}ms"
                       + (" DEGRADED" if st["degraded"] else "") for st in resp["stages"])
    console.print(f"  stages: {stages}")


def summarize(responses: list[dict], latencies: list[float]) -> None:
    lat = np.array(latencies)
    table = Table(title=f"{len(responses)} requests over HTTP")
    for col in ("stage", "count in (mean)", "count out (mean)", "p50 ms", "p99 ms", "degraded"):
        table.add_column(col, justify="right")
    names = [s["name"] for s in responses[0]["stages"]]
    for name in names:
        rows = [s for r in responses for s in r["stages"] if s["name"] == name]
        ms = np.array([s["ms"] for s in rows])
        table.add_row(name, f"{np.mean([s['count_in'] for s in rows]):.0f}",
                      f"{np.mean([s['count_out'] for s in rows]):.0f}",
                      f"{np.percentile(ms, 50):.2f}", f"{np.percentile(ms, 99):.2f}",
                      f"{sum(s['degraded'] for s in rows)}")
    table.add_row("[bold]end to end (client)", "", "", f"{np.percentile(lat, 50):.2f}",
                  f"{np.percentile(lat, 99):.2f}",
                  f"{sum(r['degraded'] for r in responses)}")
    console.print(table)
    filled = np.mean([len(r["slots"]) for r in responses])
    console.print(f"mean slots filled: {filled:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", type=Path, default=Path("runs/demo"))
    parser.add_argument("--scale", default="small")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--sample-rows", type=int, default=800_000)
    args = parser.parse_args()
    data, bundles = args.dir / "data", args.dir / "bundles"
    args.dir.mkdir(parents=True, exist_ok=True)
    started = time.time()

    step("1. simulate a marketplace")
    if not (data / "summary.json").is_file():
        run(["simulate", "--scale", args.scale, "--seed", "1", "--out", str(data)])
    else:
        console.print(f"{data} exists; keeping it")

    step("2. train every model (on a sample, to keep the demo short) and evaluate")
    if not (bundles / "current" / "manifest.json").is_file():
        run(["train", "--data", str(data), "--out", str(bundles),
             "--sample-rows", str(args.sample_rows), "--patience", "1"], offline_env())
        run(["eval", "--data", str(data), "--bundle", str(bundles),
             "--out", str(args.dir / "eval.json")], offline_env())
    else:
        console.print(f"{bundles}/current exists; keeping it")

    step("3. serve the whole cascade in one process")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "CASCADE_AUTH": "off", "PYTHONUNBUFFERED": "1"}
    env.pop("REDIS_URL", None)  # the embedded default: in-process store and event log
    log = (args.dir / "server.log").open("w")
    proc = subprocess.Popen(CASCADE + ["serve", "all", "--bundle", str(bundles), "--data",
                                       str(data), "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(url, proc)
        console.print(f"gateway ready at {url} (log: {args.dir / 'server.log'})")

        step(f"4. send {args.requests} requests")
        responses, latencies = [], []
        with httpx.Client(base_url=url, timeout=10) as client:
            for body in sample_requests(data, args.requests, seed=7):
                t0 = time.perf_counter()
                reply = client.post("/v1/ads", json=body)
                latencies.append((time.perf_counter() - t0) * 1000)
                reply.raise_for_status()
                responses.append(reply.json())
            for resp in responses[:3]:
                show_response(resp)
            summarize(responses, latencies)

            step("5. feedback: an impression and a click flow back through the event log")
            first = next(r for r in responses if r["slots"])
            slot = first["slots"][0]
            for kind in ("impression", "click"):
                ev = client.post("/v1/events", json={"event_id": f"{first['request_id']}-{kind}",
                                                     "token": slot["token"], "type": kind})
                console.print(f"{kind}: HTTP {ev.status_code} {ev.json()}")
            dup = client.post("/v1/events", json={"event_id": f"{first['request_id']}-click",
                                                  "token": slot["token"], "type": "click"})
            console.print(f"duplicate click: HTTP {dup.status_code} {dup.json()}")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
    console.print(f"[bold green]demo finished in {time.time() - started:.0f} s")
    summary = json.loads((data / "summary.json").read_text())
    console.print(f"data: {summary['ads']} ads, {summary['impressions']} impressions; "
                  f"bundle: {(bundles / 'current').resolve().name}")


if __name__ == "__main__":
    main()
