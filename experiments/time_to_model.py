"""Time to a tested model: anomalib's CFA recipe beside ours, from images on disk to test metrics.

For each product (a category in MVTec AD's layout under --data-root: train/good, test/<defect>,
ground_truth/<defect>/<stem>_mask.png) the driver runs each side once, one child process at a
time, and times the child from its start to its exit (imports, data, bank, fit, test, files):

- peer: anomalib 2.7.0's `Cfa` trained and tested by its `Engine` (`engine.train`: fit, then
  test of the last model), run by `.venv-peer/bin/python`. Its defaults throughout (batch 32,
  8 loader workers, 256 x 256 resize, validation on the test set, K = 3), with `--peer-epochs`
  epochs (30: anomalib's published `configs/model/cfa.yaml`; its CLI's default would be
  Lightning's 1000). That config's early stopping is left out: it watches `pixel_AUROC` on
  validation, which 2.7.0's default evaluator never computes. AUPRO (FPR limit 0.3, as ours) is
  added to its test metrics. Random weights: see peer_speed.random_weights_in_anomalib.
  anomalib pairs masks with images by sorting both lists of names, so `anomaly-1_mask.png`
  lands beside `anomaly-10.png`; the child reads a copy of the category made of hard links
  (untimed) in which each mask takes its image's own name, as anomalib's docs allow.
- ours: the default command, `python -m cfa_lightning.train +experiment=<backbone>
  data=shared data.category=<product> backbone.pretrained=false` (`--ours-overrides` adds
  more), with CFA_SHARED_DATA=--data-root; metrics from its run folder's metrics.json.

    python experiments/time_to_model.py --products cookies metal_plate --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEER_PYTHON = os.environ.get("CFA_PEER_PYTHON", str(ROOT / ".venv-peer" / "bin" / "python"))
DATA_ROOT = os.environ.get("CFA_SHARED_DATA", str(ROOT.parent / "shared" / "data"))
SIDES = ("peer", "ours")
# Our experiment file of each backbone that anomalib's CFA can take (torchvision's names).
EXPERIMENTS = {"resnet18": "resnet18", "wide_resnet50_2": "wide_resnet50"}
# The columns of the table, and where each side keeps them.
METRICS = {"image AUROC": ("image_AUROC", "test/image_AUROC"),
           "pixel AUROC": ("pixel_AUROC", "test/pixel_AUROC"),
           "pixel AUPRO": ("pixel_AUPRO", "test/pixel_AUPRO")}  # fmt: skip
MASK_SUFFIX = "_mask"


# ---- the peer's child (run by .venv-peer's Python) ----------------------------------------------


def peer_view(source: Path, dest: Path) -> Path:
    """A copy of the category ``source`` made of hard links (or copies across file systems) in
    which each mask ``<stem>_mask.png`` is named ``<stem>.png``, so that anomalib's sorted
    pairing matches every image with its own mask; returns ``dest``."""
    if dest.exists():
        shutil.rmtree(dest)
    for path in sorted(source.rglob("*")):
        if not path.is_file():
            continue
        relative = path.relative_to(source)
        if relative.parts[0] == "ground_truth" and path.stem.endswith(MASK_SUFFIX):
            relative = relative.with_name(path.stem.removesuffix(MASK_SUFFIX) + path.suffix)
        target = dest / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)
    return dest


def peer_child(args: argparse.Namespace) -> dict:
    """anomalib's recipe on one category; its test metrics and the settings it ran with."""
    started = time.perf_counter()
    import anomalib
    import lightning
    import torch
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from anomalib.metrics import AUPRO, AUROC, Evaluator, F1Score
    from anomalib.models import Cfa

    from peer_speed import random_weights_in_anomalib  # beside this script

    torch.set_num_threads(args.threads)
    lightning.seed_everything(args.seed)
    random_weights_in_anomalib()
    evaluator = Evaluator(test_metrics=[  # Cfa.configure_evaluator's four, and AUPRO
        AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
        F1Score(fields=["pred_label", "gt_label"], prefix="image_"),
        AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
        F1Score(fields=["pred_mask", "gt_mask"], prefix="pixel_", strict=False),
        AUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
    ])  # fmt: skip
    model = Cfa(backbone=args.backbone, evaluator=evaluator)
    datamodule = MVTecAD(root=args.view, category=args.category)
    engine = Engine(max_epochs=args.peer_epochs, default_root_dir=args.out)
    tested = engine.train(model=model, datamodule=datamodule)
    return {
        "metrics": {k: float(v) for k, v in tested[0].items()},
        "epochs_run": engine.trainer.current_epoch, "epoch_tested": engine.trainer.current_epoch,
        "input_size": [256, 256],
        "in_process_s": time.perf_counter() - started, "threads": torch.get_num_threads(),
        "versions": f"anomalib {anomalib.__version__}, torch {torch.__version__}",
    }  # fmt: skip


# ---- the driver ---------------------------------------------------------------------------------


def ours_command(args: argparse.Namespace, product: str, run_dir: Path) -> list[str]:
    """Our default command for ``product`` with random weights, its run folder set."""
    return [sys.executable, "-m", "cfa_lightning.train", f"+experiment={EXPERIMENTS[args.backbone]}",
            "data=shared", f"data.category={product}", "backbone.pretrained=false",
            *args.ours_overrides, f"hydra.run.dir={run_dir}"]  # fmt: skip


def peer_command(args: argparse.Namespace, product: str, view: Path, run_dir: Path) -> list[str]:
    return [args.peer_python, str(Path(__file__).resolve()), "--child", "--category", product,
            "--view", str(view), "--out", str(run_dir), "--backbone", args.backbone,
            "--peer-epochs", str(args.peer_epochs), "--threads", str(args.threads),
            "--seed", str(args.seed)]  # fmt: skip


def run(command: list[str], log: Path, env: dict) -> tuple[float, int, str]:
    """Run ``command`` (its output to ``log``); (wall seconds, exit status, last output line)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    code = done.returncode
    wall = time.perf_counter() - start
    lines = log.read_text(errors="replace").strip().splitlines()
    return wall, code, lines[-1] if lines else ""


def ours_result(run_dir: Path) -> dict:
    """Test metrics, epochs trained and tested, and input size from our run's metrics.json
    (epoch 0 is the untrained phi, which the validated protocol may select)."""
    saved = json.loads((run_dir / "metrics.json").read_text())
    run = saved.get("epochs")
    return {"metrics": saved["metrics"], "epochs_run": run,
            "epoch_tested": (saved.get("selection") or {}).get("epoch", run),
            "input_size": saved.get("input_size"), "train_time_s": saved.get("train_time_s")}  # fmt: skip


def time_side(args: argparse.Namespace, product: str, side: str) -> dict:
    """One side on one product: its wall time, metrics, or the error it stopped on."""
    run_dir = (args.out / f"{side}_{product}").resolve()
    if run_dir.exists():
        shutil.rmtree(run_dir)
    threads = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
           "CFA_SHARED_DATA": str(args.data_root)}  # fmt: skip
    result = {"product": product, "side": side}
    if side == "ours":
        command = ours_command(args, product, run_dir)
    else:  # untimed: the category with its masks named as anomalib pairs them
        view = peer_view(args.data_root / product, args.out.resolve() / "peer_data" / product)
        command = peer_command(args, product, view.parent, run_dir)
    result["command"] = " ".join(command)
    wall, code, last = run(command, args.out / f"{side}_{product}.log", env)
    result["wall_s"] = wall
    if code != 0:
        return {**result, "error": f"exit status {code}: {last[:300]}"}
    try:
        found = ours_result(run_dir) if side == "ours" else json.loads(last)
    except (OSError, ValueError, KeyError) as err:
        return {**result, "error": f"no metrics: {err}"}
    return {**result, **found}


HEADER = ("product", "side", "wall s", "epochs run", "epoch tested", "input (H, W)", *METRICS)


def table(results: list[dict]) -> list[str]:
    """The Markdown table: one row per (product, side); "-" where a side has no such metric."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for r in results:
        side = "anomalib" if r["side"] == "peer" else "ours"
        row = [r["product"], side, f"{r['wall_s']:.0f}" if "wall_s" in r else "-"]
        if "error" in r:
            row += ["error"] + ["-"] * (len(HEADER) - 4)
        else:
            size = r.get("input_size")
            row += [str(r.get(k, "-")) for k in ("epochs_run", "epoch_tested")]
            row.append(" x ".join(map(str, size)) if size else "-")
            keys = (names[r["side"] == "ours"] for names in METRICS.values())
            row += [f"{r['metrics'][k]:.3f}" if k in r["metrics"] else "-" for k in keys]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", nargs="+", default=["cookies", "metal_plate"])
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES),
                        help="run in this order on each product")  # fmt: skip
    parser.add_argument("--backbone", choices=sorted(EXPERIMENTS), default="resnet18")
    parser.add_argument("--data-root", type=Path, default=Path(DATA_ROOT),
                        help="the categories' parent folder (env CFA_SHARED_DATA)")  # fmt: skip
    parser.add_argument("--peer-epochs", type=int, default=30, help="anomalib's max_epochs")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each child")
    parser.add_argument("--seed", type=int, default=0, help="the peer's seed (ours: its config's)")
    parser.add_argument("--ours-overrides", nargs="*", default=[], metavar="OVERRIDE",
                        help="Hydra overrides added to our command")  # fmt: skip
    parser.add_argument("--peer-python", default=PEER_PYTHON,
                        help="the peer environment's Python (env CFA_PEER_PYTHON)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "time_to_model",
                        help="run folders and logs of both sides")  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--category", help=argparse.SUPPRESS)
    parser.add_argument("--view", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for key in ("peer_epochs", "threads"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} {getattr(args, key)}: must be at least 1")
    if args.child and not (args.category and args.view):
        parser.error("--child needs --category and --view")
    if not args.child:
        missing = [p for p in args.products if not (args.data_root / p / "train" / "good").is_dir()]
        if missing:
            parser.error(f"no train/good under {args.data_root} for {missing}; "
                         f"set --data-root or CFA_SHARED_DATA")  # fmt: skip
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(peer_child(args)), flush=True)
        return 0
    if "peer" in args.sides:
        from peer_speed import peer_missing_message, peer_ready  # beside this script

        if not peer_ready(args.peer_python):
            print(peer_missing_message(args.peer_python))
            return 2
    results = []
    for product in args.products:
        for side in args.sides:
            r = time_side(args, product, side)
            results.append(r)
            done = r.get("error") or f"{r['wall_s']:.0f} s"
            print(f"{product} {side}: {done}", file=sys.stderr, flush=True)
    print("\n".join(f"# {r['product']} {r['side']}: {r['command']}" for r in results) + "\n")
    print("\n".join(table(results)))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
