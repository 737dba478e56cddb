"""The honest tuning protocol in one command: tune on validation, retrain, test once, compare.

1. An Optuna sweep (``+sweep=tune`` by default) chooses hyper-parameters on the synthetic-anomaly
   validation split; its trials never score the test set.
2. The best configuration and the default one are each retrained for every seed (``--final``
   overrides; by default none: the validated protocol, the epoch chosen on validation;
   ``--final +protocol=paper`` retrains on all of train/good for a fixed number of epochs) and
   tested once.
3. ``comparison.json`` / ``comparison.md``: the test metrics of both, mean ± std over the seeds
   (sample std, n - 1), in the table of ``aggregate.py``.

``--proxy`` is a study of the method, not part of it: the trials also score the test set
(``test_after_fit=true``), and ``proxy.json`` holds Spearman's rank correlation, across the
trials, between the validation objective and the same trial's test metrics, computed after the
choice and only to judge how good a proxy the synthetic validation is.

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
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import ConstantInputWarning, spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import aggregate  # noqa: E402
from cfa_lightning.tuning import override_value  # noqa: E402

PROXY_METRICS = ("test/image_AUROC", "test/pixel_AUROC", "test/pixel_AUPRO")


def run_train(args: list[str], multirun: bool = False) -> None:
    command = [sys.executable, "-m", "cfa_lightning.train", *(["-m"] if multirun else []), *args]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def rank_correlation(x: list[float], y: list[float]) -> float:
    """Spearman's rho of the finite pairs (scipy); NaN with fewer than 3 pairs or a constant side."""
    x_arr, y_arr = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    finite = np.isfinite(x_arr) & np.isfinite(y_arr)
    if finite.sum() < 3:
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConstantInputWarning)  # constant: NaN, reported as such
        return float(spearmanr(x_arr[finite], y_arr[finite]).statistic)


def proxy_quality(tune_dir: Path, objective: str) -> dict[str, Any]:
    """Spearman correlation across trials of the objective with each test metric."""
    with (tune_dir / "trials.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["status"] == "ok"]

    def column(name: str) -> list[float]:
        return [float(r[name]) if r.get(name) not in (None, "") else math.nan for r in rows]

    return {
        "objective": objective,
        "n_trials": len(rows),
        "spearman": {m: rank_correlation(column("objective"), column(m)) for m in PROXY_METRICS},
    }


def markdown(summary: dict[str, dict[str, Any]]) -> str:
    """Both configurations side by side, in aggregate.py's mean ± std table."""
    lines = aggregate.table("configuration", summary)
    lines.append("\nValues in %, mean ± sample std over the seeds; each model tested once.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for all results")
    parser.add_argument("--common", nargs="*", default=[], help="overrides for every run")
    parser.add_argument("--tune", nargs="*", default=["+sweep=tune"], help="sweep overrides")
    parser.add_argument(
        "--final", nargs="*", default=[],
        help="overrides of the retrained runs only (default: none, the validated protocol)",
    )  # fmt: skip
    parser.add_argument("--default", nargs="*", default=[], help="extra overrides, default only")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--skip-tune", action="store_true", help="reuse <out>/tune")
    parser.add_argument(
        "--proxy", action="store_true",
        help="trials also score the test set, for proxy.json only (a study of the proxy)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    out = args.out.resolve()
    tune_dir = out / "tune"

    if not args.skip_tune:  # 1. tune on validation
        proxy_test = ["test_after_fit=true"] if args.proxy else []
        run_train([*args.common, *args.tune, *proxy_test, f"hydra.sweep.dir={tune_dir}"],
                  multirun=True)  # fmt: skip
    best = json.loads((tune_dir / "best.json").read_text())
    tuned = [f"{k}={override_value(v)}" for k, v in best["best_params"].items()]
    if args.proxy:  # after the choice, and only to judge the proxy
        proxy = proxy_quality(tune_dir, best["objective"])
        (out / "proxy.json").write_text(json.dumps(proxy, indent=2) + "\n")
        print(json.dumps(proxy, indent=2))

    for seed in args.seeds:  # 2. retrain both, test each once
        for name, extra in (("default", args.default), ("tuned", tuned)):
            run_dir = out / name / f"seed{seed}"
            if not (run_dir / "metrics.json").is_file():
                run_train([*args.common, *args.final, *extra, f"seed={seed}",
                           f"hydra.run.dir={run_dir}"])  # fmt: skip

    runs = {
        name: [r for r in aggregate.load_runs([out / name]) if r["seed"] in args.seeds]
        for name in ("default", "tuned")
    }
    summary = {name: aggregate.seed_summary(name_runs) for name, name_runs in runs.items()}
    payload = {"seeds": args.seeds, "tuned_params": best["best_params"], "summary": summary,
               "runs": runs, "final_overrides": args.final, "common": args.common}  # fmt: skip
    (out / "comparison.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / "comparison.md").write_text(markdown(summary))  # 3. side by side
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
