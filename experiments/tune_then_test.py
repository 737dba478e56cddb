"""The honest tuning protocol in one command: tune on validation, retrain, test once, compare.

1. An Optuna sweep (``+sweep=tune`` by default) chooses hyper-parameters on the synthetic-anomaly
   validation split; the test set plays no part in the choice.
2. The best configuration and the default one are each retrained on the full training split
   (``--final`` overrides, by default ``data.val_fraction=0``: all of train/good) for every seed
   and tested once.
3. ``comparison.json`` / ``comparison.md``: the test metrics of both, mean +- std over the seeds
   (sample std, n - 1). ``proxy.json``: Spearman's rank correlation, across the trials, between
   the validation objective and the same trial's test metrics; computed after the study, only to
   report how good a proxy the synthetic validation is.

Example (cookies from ../shared/data, CPU):

    python experiments/tune_then_test.py --out results/tune_cookies \\
        --common +experiment=efficientnet_lite0 data=shared data.category=cookies \\
        --tune +sweep=tune_cpu data.val_fraction=0.25 data.synthetic_anomalies.per_image=4
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from cfa_lightning.tuning import _override_value, spearman  # noqa: E402

METRICS = ("test/image_AUROC", "test/pixel_AUROC", "test/pixel_AUPRO")


def run_train(args: list[str], multirun: bool = False) -> None:
    command = [sys.executable, "-m", "cfa_lightning.train", *(["-m"] if multirun else []), *args]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def proxy_quality(tune_dir: Path, objective: str) -> dict[str, Any]:
    """Spearman correlation across trials of the objective with each test metric."""
    with (tune_dir / "trials.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["status"] == "ok"]

    def column(name: str) -> list[float]:
        return [float(r[name]) if r.get(name) not in (None, "") else math.nan for r in rows]

    return {
        "objective": objective,
        "n_trials": len(rows),
        "spearman": {m: spearman(column("objective"), column(m)) for m in METRICS},
    }


def summarise(runs: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, list[float]]]:
    out: dict[str, dict[str, list[float]]] = {}
    for name, results in runs.items():
        out[name] = {}
        for metric in METRICS:
            values = [r[metric] for r in results if metric in r]
            std = statistics.stdev(values) if len(values) > 1 else math.nan
            out[name][metric] = [statistics.fmean(values), std] if values else [math.nan] * 2
    return out


def markdown(summary: dict[str, dict[str, list[float]]], seeds: list[int]) -> str:
    head = "| configuration | " + " | ".join(METRICS) + " |"
    lines = [head, "|---" * (len(METRICS) + 1) + "|"]
    for name, metrics in summary.items():
        cells = [f"{m:.3f} +- {s:.3f}" for m, s in metrics.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append(f"\nmean +- sample std over seeds {seeds}; each model tested once.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for all results")
    parser.add_argument("--common", nargs="*", default=[], help="overrides for every run")
    parser.add_argument("--tune", nargs="*", default=["+sweep=tune"], help="sweep overrides")
    parser.add_argument(
        "--final", nargs="*", default=["data.val_fraction=0", "data.val_anomalies=none"],
        help="overrides of the retrained runs (default: all of train/good)",
    )  # fmt: skip
    parser.add_argument("--default", nargs="*", default=[], help="extra overrides, default only")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--skip-tune", action="store_true", help="reuse <out>/tune")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    tune_dir = out / "tune"

    if not args.skip_tune:  # 1. tune on validation
        run_train([*args.common, *args.tune, f"hydra.sweep.dir={tune_dir}"], multirun=True)
    best = json.loads((tune_dir / "best.json").read_text())
    tuned = [f"{k}={_override_value(v)}" for k, v in best["best_params"].items()]
    proxy = proxy_quality(tune_dir, best["objective"])
    (out / "proxy.json").write_text(json.dumps(proxy, indent=2) + "\n")
    print(json.dumps(proxy, indent=2))

    runs: dict[str, list[dict[str, float]]] = {"default": [], "tuned": []}
    for seed in args.seeds:  # 2. retrain both on the full training split, test once
        for name, extra in (("default", args.default), ("tuned", tuned)):
            run_dir = out / name / f"seed{seed}"
            if not (run_dir / "metrics.json").is_file():
                run_train([*args.common, *args.final, *extra, f"seed={seed}",
                           f"hydra.run.dir={run_dir}"])  # fmt: skip
            runs[name].append(json.loads((run_dir / "metrics.json").read_text())["metrics"])

    summary = summarise(runs)  # 3. side by side
    payload = {"seeds": args.seeds, "tuned_params": best["best_params"], "summary": summary,
               "runs": runs, "final_overrides": args.final, "common": args.common}  # fmt: skip
    (out / "comparison.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / "comparison.md").write_text(markdown(summary, args.seeds))
    print(markdown(summary, args.seeds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
