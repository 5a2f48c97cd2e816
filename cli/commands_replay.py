"""`cascade replay`: closed-loop marketplace replay, arm against arm, under the truth."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from cli.main import app

console = Console(width=None if Console().is_terminal else 140)


@app.command()
def replay(
    data: Path = typer.Option(..., "--data", help="A simulated marketplace (its truth is "
                              "rebuilt from the recorded config and seed)."),
    bundle: Path = typer.Option(..., "--bundle", help="Bundle version dir or BUNDLES root."),
    requests: int = typer.Option(..., "--requests", help="Requests to replay (each arm sees "
                                 "the same ones)."),
    out: Path = typer.Option(..., "--out", help="Replay JSON file to write (the plot goes "
                             "beside it as .png)."),
    url: str = typer.Option("", "--url", help="Run only the cascade arm against this running "
                            "gateway over HTTP (CASCADE_API_KEY is sent if set)."),
    seed: int = typer.Option(0, "--seed", help="Traffic and click draws."),
    arms: str = typer.Option("", "--arms", help="Comma-separated subset of cascade, "
                             "full-ranker, oracle, qscore-only, dqm-only (default: all)."),
    top_n: int = typer.Option(10, "--top-n", help="Size of the top-N the funnel follows."),
    funnel_requests: int = typer.Option(100, "--funnel-requests", help="Requests sampled for "
                                        "each arm's own funnel (the cascade's costs a DIN+ESMM "
                                        "pass over the whole corpus)."),
    full_ranker_requests: int = typer.Option(0, "--full-ranker-requests", help="Replay only "
                                             "the first N requests in the full-ranker arm "
                                             "(DIN+ESMM over the whole corpus per request); "
                                             "comparisons with it pair that prefix. 0 = all."),
) -> None:
    """Serve the same requests through each arm, answer them with the simulator's true pCTR
    and pCVR, feed the events back, and report revenue, advertiser value and the funnel."""
    from rich.progress import Progress

    from services.replay.arms import ARMS
    from services.replay.engine import ReplayConfig
    from services.replay.replay import run_replay, write_outputs
    from services.replay.report import table

    if requests < 1:
        raise ValueError("--requests must be at least 1")
    if top_n < 1 or funnel_requests < 0 or full_ranker_requests < 0:
        raise ValueError("--top-n must be at least 1, --funnel-requests and "
                         "--full-ranker-requests at least 0")
    chosen = tuple(a.strip() for a in arms.split(",") if a.strip()) or ARMS
    unknown = [a for a in chosen if a not in ARMS]
    if unknown:
        raise ValueError(f"unknown arm(s) {', '.join(unknown)} (arms: {', '.join(ARMS)})")
    if not data.is_dir():
        raise ValueError(f"data directory not found: {data}")
    if not bundle.exists():
        raise ValueError(f"bundle not found: {bundle}")
    config = ReplayConfig(top_n=top_n, funnel_requests=funnel_requests,
                          full_ranker_requests=full_ranker_requests)
    per_arm = {arm: requests for arm in (("cascade",) if url else chosen)}
    if "full-ranker" in per_arm and full_ranker_requests:
        per_arm["full-ranker"] = min(requests, full_ranker_requests)
    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("replay", total=sum(per_arm.values()))
        result = run_replay(data, bundle, requests, seed=seed, url=url or None, arms=chosen,
                            config=config,
                            progress=lambda arm: bar.update(task, advance=1,
                                                            description=f"replay {arm}"))
    json_path, png = write_outputs(result, out)
    console.print(f"replay: {requests} requests, bundle {result['bundle']}, seed {seed} "
                  f"({result['mode']})")
    print(table(result["arms"]))
    goals = result["goals"]
    console.print(f"cascade / full-ranker expected revenue, paired-bootstrap 95% lower bound: "
                  f"{goals['cascade_vs_full_ranker_lower_95']}", markup=False)
    console.print(f"wrote {json_path} and {png}")
