"""Writes the README's measured figures from real command runs and their JSON outputs.

    python -m scripts.figures simulator [--skip-large]      # runs cascade simulate x3, timed
    python -m scripts.figures quality  --eval FILE --command "..."
    python -m scripts.figures stages   --bench FILE --command "..."
    python -m scripts.figures load     --summary FILE --command "..."
    python -m scripts.figures datasets --eval NAME=FILE [--eval NAME=FILE ...] --command "..."

Each rewrites one block of README.md between `<!-- figures:NAME:begin/end -->` markers, so the
README never carries a number typed in by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def replace_block(name: str, body: str) -> None:
    text = README.read_text()
    begin, end = f"<!-- figures:{name}:begin -->", f"<!-- figures:{name}:end -->"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit(f"README.md has no {begin} block")
    README.write_text(pattern.sub(lambda _: f"{begin}\n{body.strip()}\n{end}", text))


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one child process."""
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed")
    return time.time() - start, usage.ru_maxrss / 1024


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}"


def pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def simulator(args: argparse.Namespace) -> None:
    cascade = [sys.executable, "-m", "cli.main"]
    rows, summaries = [], {}
    scales = ["tiny", "small"] + ([] if args.skip_large else ["large"])
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for scale in scales:
            out = Path(tmp) / scale
            cmd = cascade + ["simulate", "--scale", scale, "--seed", "1", "--out", str(out)]
            seconds, rss = timed(cmd)
            summary = json.loads((out / "summary.json").read_text())
            summaries[scale] = summary
            rows.append(f"| `{scale}` | {summary['ads']:,} | {summary['impressions']:,} | "
                        f"{seconds:.1f} s | {rss:,.0f} MiB |")
            subprocess.run(["rm", "-rf", str(out)], check=True)
    small = summaries["small"]
    lines = [
        "### The simulator",
        "",
        f"`cascade simulate --scale S --seed 1 --out DIR`, timed with its peak resident memory "
        f"(`python -m scripts.figures simulator`) on {machine()}:",
        "",
        "| scale | ads | impressions | wall time | peak memory |",
        "|---|---:|---:|---:|---:|",
        *rows,
        "",
        f"`small` (seed 1): {small['ads']:,} ads, {small['users']:,} users, "
        f"{small['impressions']:,} impressions, CTR {pct(small['ctr'])}, CVR {pct(small['cvr'])}. "
        f"Oracle (true probabilities): CTR AUC {small['oracle']['ctr_auc']:.4f}, "
        f"CTR GAUC {small['oracle']['ctr_gauc']:.4f}, CVR AUC (clicked impressions) "
        f"{small['oracle']['cvr_auc']:.4f}.",
        "",
        "| scene | impressions | CTR | CVR |",
        "|---|---:|---:|---:|",
        *[f"| {name} | {s['impressions']:,} | {pct(s['ctr'])} | {pct(s['cvr'])} |"
          for name, s in small["by_scene"].items()],
        "",
        "| position | impressions | CTR |",
        "|---|---:|---:|",
        *[f"| {pos} | {s['impressions']:,} | {pct(s['ctr'])} |"
          for pos, s in small["by_position"].items()],
    ]
    replace_block("simulator", "\n".join(lines))


def _fmt(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else ("" if value is None else str(value))


def quality(args: argparse.Namespace) -> None:
    result = json.loads(Path(args.eval).read_text())
    rows = {"oracle": result.get("oracle", {}), **result["models"]}
    if result.get("oracle_learnable"):
        rows = {"oracle": rows.pop("oracle"), "oracle_learnable": result["oracle_learnable"],
                **rows}
    keys = ["ctr_auc", "ctr_gauc", "logloss", "calibration", "cvr_auc", "cvr_fidelity",
            "cvr_calibration", "ctcvr_auc", "recall@100", "recall@500", "recall@1000"]
    keys = [k for k in keys if any(k in m for m in rows.values())]
    lines = ["### Model quality against the oracle", "", f"`{args.command}` on {machine()}; "
             f"test split of {result['rows']:,} impressions ("
             + ("the dataset's own test rows" if result.get("split") == "column"
                else "the latest 10% by time") + ").", "",
             "| model | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for name, metrics in rows.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(metrics.get(k)) for k in keys) + " |")
    lines += ["", *quality_goals(result)]
    if args.time_log:
        wall, rss = parse_time_log(Path(args.time_log).read_text())
        lines += ["", f"`cascade train` of every model took {wall} wall time with a peak of "
                  f"{rss / 1024 / 1024:.1f} GiB (`/usr/bin/time -v`)."]
    if args.note:
        lines += ["", args.note]
    replace_block("quality", "\n".join(lines))


def parse_time_log(text: str) -> tuple[str, float]:
    """(wall clock, max RSS in KiB) from GNU time's -v report."""
    wall = re.search(r"Elapsed \(wall clock\) time .*?: (\S+)", text)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    if not wall or not rss:
        raise SystemExit("--time-log: not a `/usr/bin/time -v` report")
    return wall.group(1), float(rss.group(1))


def quality_goals(result: dict) -> list[str]:
    """The models issue's goals, each checked against the eval JSON."""
    m, o = result["models"], result.get("oracle", {})
    din, base, cvr, dqm, qs = (m.get(k, {}) for k in ("din_esmm", "base", "cvr_base", "dqm",
                                                      "qscore"))
    rows = []

    def goal(text: str, measured: str, met: bool) -> None:
        rows.append(f"| {text} | {measured} | {'met' if met else 'missed'} |")

    learnable = result.get("oracle_learnable", {})
    for ref, truth in (("oracle", o), ("oracle_learnable", learnable)):
        if din and truth:
            for key in ("ctr_auc", "ctr_gauc"):
                gap = truth[key] - din[key]
                goal(f"DIN+ESMM {key} within 0.04 of `{ref}`", f"{gap:+.4f} below", gap <= 0.04)
    if din and base:
        diff = din["ctr_auc"] - base["ctr_auc"]
        goal("DIN+ESMM >= `base` + 0.03 (CTR AUC)", f"{diff:+.4f}", diff >= 0.03)
    if din and cvr:
        fid = din["cvr_fidelity"] - cvr["cvr_fidelity"]
        goal("ESMM CVR fidelity >= `cvr_base` + 0.03", f"{fid:+.4f}", fid >= 0.03)
        auc_diff = din["cvr_auc"] - cvr["cvr_auc"]
        goal("ESMM CVR AUC (clicked) >= `cvr_base`", f"{auc_diff:+.4f}", auc_diff >= 0)
    if din:
        goal("CTR calibration within 5%", f"{din['calibration']:.4f}",
             abs(din["calibration"] - 1) <= 0.05)
    if dqm and qs and din:
        goal("Qscore < DQM < DIN (CTR AUC)",
             f"{qs['ctr_auc']:.4f} < {dqm['ctr_auc']:.4f} < {din['ctr_auc']:.4f}",
             qs["ctr_auc"] < dqm["ctr_auc"] < din["ctr_auc"])
    return ["| goal | measured | |", "|---|---|---|", *rows]


BASELINES = ("qscore", "dqm", "base")


DATASET_TITLES = {"datasets": "The same defaults on other data",
                  "public": "A public dataset: MovieLens 100k"}


def datasets(args: argparse.Namespace) -> None:
    """DIN+ESMM against its baselines on several datasets, each trained with default flags:
    the models issue's "beats qscore, dqm and base on CTR AUC and GAUC" goal, per dataset."""
    lines = [f"### {DATASET_TITLES[args.block]}", "", f"`{args.command}` on {machine()}:", "",
             "| data | test rows | metric | oracle | din_esmm | " + " | ".join(BASELINES)
             + " | DIN+ESMM ahead of all three |", "|---|---:|---|---:|---:|"
             + "---:|" * len(BASELINES) + "---|"]
    for spec in args.eval:
        name, _, path = spec.partition("=")
        if not path:
            raise SystemExit(f"--eval {spec!r}: expected NAME=FILE")
        result = json.loads(Path(path).read_text())
        models = result["models"]
        for key in ("ctr_auc", "ctr_gauc"):
            din = models.get("din_esmm", {}).get(key)
            others = [models.get(b, {}).get(key) for b in BASELINES]
            ahead = din is not None and all(o is not None and din > o for o in others)
            lines.append(f"| {name} | {result['rows']:,} | {key} | "
                         f"{_fmt(result.get('oracle', {}).get(key))} | {_fmt(din)} | "
                         + " | ".join(_fmt(o) for o in others)
                         + f" | {'met' if ahead else 'missed'} |")
    if args.note:
        lines += ["", args.note]
    replace_block(args.block, "\n".join(lines))


def stages(args: argparse.Namespace) -> None:
    result = json.loads(Path(args.bench).read_text())
    lines = ["### Stage latency", "", f"`{args.command}` on {result.get('machine', machine())}:",
             "", "| stage | p50 ms | p99 ms | per s | naive p50 ms | naive p99 ms | naive per s |"
             " notes |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for name in ("retrieval", "prerank", "rank"):
        s = result.get(name)
        if not s:
            continue
        naive = s.get("naive", {})
        note = ", ".join(f"{k}={_fmt(v)}" for k, v in s.items()
                         if k not in ("p50_ms", "p99_ms", "per_s", "naive")
                         and not isinstance(v, dict | list))
        lines.append(f"| {name} | {s['p50_ms']:.3f} | {s['p99_ms']:.3f} | {s['per_s']:,.0f} | "
                     f"{naive.get('p50_ms', float('nan')):.3f} | "
                     f"{naive.get('p99_ms', float('nan')):.3f} | "
                     f"{naive.get('per_s', float('nan')):,.0f} | {note} |")
    if args.note:
        lines += ["", args.note]
    replace_block("stages", "\n".join(lines))


LOAD_TITLES = {"load": "End-to-end load: embedded",
               "load-stack": "End-to-end load: the distributed stack"}


def load(args: argparse.Namespace) -> None:
    result = json.loads(Path(args.summary).read_text())
    keys = ("offered_rps", "achieved_rps", "p50_ms", "p95_ms", "p99_ms", "p999_ms",
            "error_rate", "degraded_share")
    title = LOAD_TITLES.get(args.block, "End-to-end load")
    lines = [f"### {title}", "", f"`{args.command}` on {machine()}, Locust on the same "
             "machine:", "", "| " + " | ".join(keys) + " |", "|" + "---:|" * len(keys),
             "| " + " | ".join(_fmt(result.get(k)) for k in keys) + " |"]
    extra = ("arrival_cv", "max_in_flight", "cpu_ms_per_request", "loadgen_cpu_ms_per_request",
             "shed_rate", "send_lag_p99_ms")
    lines += ["", "| " + " | ".join(extra) + " |", "|" + "---:|" * len(extra),
              "| " + " | ".join(_fmt(result.get(k)) for k in extra) + " |"]
    for label, other in (("HTTP ceiling (trivial FastAPI app, same server setup, same load)",
                          result.get("ceiling")),
                         ("with feedback events", result.get("with_feedback"))):
        if other:
            lines += ["", f"{label}:", "", "| " + " | ".join(keys + ("cpu_ms_per_request",))
                      + " |", "|" + "---:|" * (len(keys) + 1),
                      "| " + " | ".join(_fmt(other.get(k)) for k in keys + ("cpu_ms_per_request",))
                      + " |"]
    if result.get("steps"):
        lines += ["", "Step run (offered load against latency):", "",
                  "| offered_rps | achieved_rps | p50_ms | p99_ms | degraded_share | shed_rate "
                  "| cpu_ms_per_request |", "|---:|---:|---:|---:|---:|---:|---:|"]
        for step in result["steps"]:
            lines.append("| " + " | ".join(_fmt(step.get(k)) for k in (
                "offered_rps", "achieved_rps", "p50_ms", "p99_ms", "degraded_share", "shed_rate",
                "cpu_ms_per_request")) + " |")
    by_thread = result.get("cpu_ms_per_request_by_thread") or {}
    if by_thread:
        lines += ["", "Server CPU per request by thread (ms; `event_loop`: each worker's main "
                  "thread):", "", "| " + " | ".join(by_thread) + " |",
                  "|" + "---:|" * len(by_thread),
                  "| " + " | ".join(_fmt(v) for v in by_thread.values()) + " |"]
    if result.get("stages"):
        lines += ["", "| stage | p50 ms | p99 ms |", "|---|---:|---:|"]
        for name, s in result["stages"].items():
            lines.append(f"| {name} | {_fmt(s.get('p50_ms'))} | {_fmt(s.get('p99_ms'))} |")
    if args.plot:
        lines += ["", f"![latency against offered load]({args.plot})"]
    if args.note:
        lines += ["", args.note]
    replace_block(args.block, "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("simulator")
    p.add_argument("--skip-large", action="store_true")
    p.add_argument("--workdir", default=None)
    p.set_defaults(fn=simulator)
    for name, flag, fn in (("quality", "--eval", quality), ("stages", "--bench", stages),
                           ("load", "--summary", load), ("datasets", "--eval", datasets)):
        p = sub.add_parser(name)
        if name == "datasets":
            p.add_argument(flag, required=True, action="append", help="NAME=FILE, repeated")
        else:
            p.add_argument(flag, required=True)
        p.add_argument("--command", required=True)
        p.add_argument("--note", default="")
        if name == "quality":
            p.add_argument("--time-log", default="")
        if name == "load":
            p.add_argument("--plot", default="")
            p.add_argument("--block", default="load")
        if name == "datasets":
            p.add_argument("--block", default="datasets", choices=sorted(DATASET_TITLES))
        p.set_defaults(fn=fn)
    args = parser.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
