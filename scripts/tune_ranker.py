"""A small, recorded search over the ranker's training settings, on validation rows only.

Each trial trains the named models with `cascade train`'s trainer (same split, same loop) and
records the validation metrics the trainer computes on the split's validation rows; the test
rows are never read. Results go to a JSON file that is committed beside the defaults it chose.

    python -m scripts.tune_ranker --data DIR --out scripts/tuning/NAME.json [--max-rows N]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import torch

from models.train.loop import FitConfig
from models.train.trainer import TrainOptions, train

# One idea per trial against the defaults, so each row of the result says what that idea buys.
TRIALS: dict[str, dict[str, Any]] = {
    "default": {},
    "stop_on_loss": {"stop_on_auc": False},
    "min_id_count=3": {"min_id_count": 3},
    "min_id_count=10": {"min_id_count": 10},
    "mba_lambda=1e-3": {"mba_lambda": 1e-3},
    "mba_lambda=1e-2": {"mba_lambda": 1e-2},
    "sparse_lr=5e-4": {"fit": {"sparse_lr": 5e-4}},
    "sparse_lr=2e-4": {"fit": {"sparse_lr": 2e-4}},
    "sparse_lr=5e-3": {"fit": {"sparse_lr": 5e-3}},
    "sparse_lr=1e-2": {"fit": {"sparse_lr": 1e-2}},
    "lr=5e-3+sparse_lr=5e-4": {"fit": {"lr": 5e-3, "sparse_lr": 5e-4}},
    "adagrad_lr=0.02": {"fit": {"sparse_optimizer": "adagrad", "sparse_lr": 0.02}},
    "adagrad_lr=0.05": {"fit": {"sparse_optimizer": "adagrad", "sparse_lr": 0.05}},
    "adagrad_lr=0.01": {"fit": {"sparse_optimizer": "adagrad", "sparse_lr": 0.01}},
    "lr=1e-3": {"fit": {"lr": 1e-3, "sparse_lr": 1e-3}},
    "batch_size=1024": {"fit": {"batch_size": 1024}},
    "batch_size=256": {"fit": {"batch_size": 256}},
    "batch_size=256+mba_lambda=1e-2": {"fit": {"batch_size": 256}, "mba_lambda": 1e-2},
    "dropout=0.2": {"config": {"dropout": 0.2}},
    "tower=(256,128)": {"config": {"tower_hidden": [256, 128]}},
    "tower=(64,32)": {"config": {"tower_hidden": [64, 32]}},
    "attention=(64,32)": {"config": {"attention_hidden": [64, 32]}},
    "attention_softmax": {"config": {"attention_softmax": True}},
    "interest_match": {"config": {"interest_match": True}},
    "no_interest_match": {"config": {"interest_match": False}},
    "no_ad_offsets": {"config": {"ad_offsets": False}},
    "cvr_click_weight=0.5": {"config": {"cvr_click_weight": 0.5}},
    "cvr_click_weight=1": {"config": {"cvr_click_weight": 1.0}},
    "cvr_click_weight=3": {"config": {"cvr_click_weight": 3.0}},
}


def options_for(trial: dict[str, Any], base: TrainOptions, models: tuple[str, ...]
                ) -> TrainOptions:
    fit = replace(base.fit, **trial.get("fit", {}))
    configs = {m: dict(trial.get("config", {})) for m in models if m != "qscore"}
    extra = {k: v for k, v in trial.items() if k not in ("fit", "config")}
    return replace(base, models=models, fit=fit, configs=configs, **extra)


def run_trial(data: Path, options: TrainOptions) -> dict[str, Any]:
    started = time.time()
    with TemporaryDirectory() as tmp:
        writer, _ = train(data, tmp, options)
        entries = writer.manifest["models"]
        writer.abort()
    return {"seconds": round(time.time() - started, 1),
            "models": {name: {"metrics": e.get("metrics", {}), "best_step": e.get("best_step"),
                              "history": e.get("history"),
                              "steps": e.get("steps")} for name, e in entries.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", default="din_esmm,base")
    parser.add_argument("--trials", default="", help="Comma-separated trial names (default all).")
    parser.add_argument("--max-rows", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=FitConfig.max_steps)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = tuple(m for m in args.models.split(",") if m)
    base = TrainOptions(models=models, device="cpu", max_rows=args.max_rows or None,
                        fit=FitConfig(max_steps=args.max_steps))
    names = [n for n in args.trials.split(",") if n] or list(TRIALS)
    results: dict[str, Any] = {}
    if args.out.is_file():
        results = json.loads(args.out.read_text()).get("trials", {})
    for name in names:
        results[name] = {"settings": TRIALS[name],
                         **run_trial(args.data, options_for(TRIALS[name], base, models))}
        print(name, json.dumps(results[name]["models"]), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "data": str(args.data), "max_rows": args.max_rows, "max_steps": args.max_steps,
            "models": models, "note": "validation rows of the trainer's split only",
            "trials": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
