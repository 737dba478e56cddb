"""One PNG of the drift study's per-epoch curves: validation and development-test metrics.

Reads the run JSONs written by ``experiments/drift_study.py`` and draws, per category (rows),
the validation selection metric at every epoch and the test metrics (DEVELOPMENT DATA: the
../shared/data test sets) at the epochs that were tested, mean over seeds with a min-max band,
one line per variant (thin lines: each seed at the epochs it was tested).

    python experiments/plot_curves.py --runs experiments/results/drift \
        --out docs/figures/drift_curves.png

Needs matplotlib: pip install -e '.[plot]'.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from drift_study import load_runs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PANELS = (
    ("val/pixel_AUPRO", "validation AUPRO (synthetic)"),
    ("test/pixel_AUPRO", "test AUPRO (dev)"),
    ("test/pixel_AUROC", "test pixel AUROC (dev)"),
    ("test/image_AUROC", "test image AUROC (dev)"),
)
CATEGORIES = ("cookies", "metal_plate", "magnetic_tile")
COLOURS = {
    "base": "black",
    "base_30ep": "tab:red",  # magnetic_tile: one seed run to 30 epochs (--tag _30ep)
    "cosine": "tab:blue",
    "lr1e-4": "tab:orange",
    "ema": "tab:green",
}


def curve(runs: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Epochs where every seed has ``key``, and the (seeds, epochs) values there."""
    epochs = sorted(
        set.intersection(*({r["epoch"] for r in run["curve"] if key in r} for run in runs))
    )
    values = np.array([[run["curve"][e][key] for e in epochs] for run in runs])
    return np.array(epochs), values


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=ROOT / "experiments" / "results" / "drift")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "figures" / "drift_curves.png")
    parser.add_argument("--variants", nargs="+", default=list(COLOURS))
    args = parser.parse_args(argv)

    groups = load_runs(args.runs)
    categories = [c for c in CATEGORIES if any(k[0] == c for k in groups)]
    if not categories:
        raise SystemExit(f"no drift_study.py results in {args.runs}")
    fig, axes = plt.subplots(len(categories), len(PANELS), figsize=(4.2 * len(PANELS), 3.0 * len(categories)),
                             squeeze=False)  # fmt: skip
    for i, category in enumerate(categories):
        for j, (key, title) in enumerate(PANELS):
            ax = axes[i][j]
            for variant in args.variants:
                runs = groups.get((category, variant))
                if not runs:
                    continue
                epochs, values = curve(runs, key)
                if not len(epochs):
                    continue
                colour = COLOURS.get(variant)
                for run in runs:  # every seed at the epochs it was tested: thin lines
                    own = [r for r in run["curve"] if key in r]
                    ax.plot([r["epoch"] for r in own], [r[key] for r in own], color=colour,
                            lw=0.6, alpha=0.35)  # fmt: skip
                label = f"{variant} ({len(runs)} seed{'s' * (len(runs) > 1)})"
                ax.plot(epochs, values.mean(0), marker=".", color=colour, label=label, lw=1.2)
                ax.fill_between(epochs, values.min(0), values.max(0), color=colour, alpha=0.15)
            ax.set_title(f"{category}: {title}", fontsize=9)
            ax.set_xlabel("epochs trained (0: un-adapted phi)", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            if j == 0:  # each row's variants: magnetic_tile has its own
                ax.legend(fontsize=7)
    fig.suptitle("CFA, tf_efficientnet_lite0, 256 px: thick: mean over seeds at the epochs all were tested, "
                 "band: min-max; thin: each seed. "
                 "Test = development data (../shared/data), never used for selection.", fontsize=9)  # fmt: skip
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
