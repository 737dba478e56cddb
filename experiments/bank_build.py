"""Time and peak memory of building the memory bank from real images, one bank per process.

Builds the bank of a `CFALitModule` outside a Trainer with its own `build_bank` over the
training images of an MVTec-layout category (the split, size and batch of `data=shared`), so the
figures are those of the start of a fit. Each bank runs in a fresh subprocess, so peaks do not
mix. Timed: the whole `build_bank` call and the selection alone (`MemoryBank.finalize`: the
mean, k-means or coreset step); the rest is phi's pass over the images. Memory: the process's
peak RSS (VmHWM), and that peak less the RSS just before the build (reset through
/proc/self/clear_refs), whole and split into phi's pass (with the pool it fills) and the
selection, beside the model's own estimate `bank.build_bytes(n_images)`.
Not counted: the tap cache a fit keeps during the build (model.tap_cache_mb), which only a
Trainer turns on. Time and memory do not depend on the backbone's weights, so a backbone whose
weights come from the hub may run with random ones (`--random-weights`).

    OMP_NUM_THREADS=1 taskset -c 1 python experiments/bank_build.py \
        --backbone tf_efficientnet_lite0 --banks positional kmeans coreset coreset:16384 \
        --json experiments/results/bank/build_tf_efficientnet_lite0.json
    OMP_NUM_THREADS=1 taskset -c 1 python experiments/bank_build.py \
        --backbone wide_resnet50_2 --random-weights --banks positional kmeans coreset \
        coreset:16384 --json experiments/results/bank/build_wide_resnet50_2.json
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

import benchmark  # experiments/benchmark.py, beside this script: its peak-memory tools
from benchmark import status_mb
from cfa_lightning.config import CONFIG_DIR
from cfa_lightning.data import MVTecDataModule
from cfa_lightning.models.lit_module import CFALitModule, model_config

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
FIELDS = ("construction", "size", "centres", "dims", "pool", "images", "build_s", "select_s",
          "peak_rss_mb", "peak_above_mb", "pass_peak_above_mb", "select_peak_above_mb",
          "estimate_mb")  # fmt: skip


def reset_peak() -> float:
    """Collect garbage, start a new peak RSS (benchmark.py), and return the current RSS (MB)."""
    gc.collect()
    benchmark.reset_peak(CPU)
    return status_mb("VmRSS")


def backbone_config(name: str, random_weights: bool) -> dict:
    """The conf/backbone group whose timm model is `name` (tag ignored), as a plain dict."""
    for path in sorted((Path(CONFIG_DIR) / "backbone").glob("*.yaml")):
        cfg = OmegaConf.to_container(OmegaConf.load(path))
        if cfg["name"].split(".")[0] == name:
            return {**cfg, "pretrained": cfg["pretrained"] and not random_weights}
    raise SystemExit(f"no conf/backbone/*.yaml has name {name!r}")


def build_one(args: argparse.Namespace) -> dict:
    """Build one bank (`args.one`: construction[:size]) in this process and measure it."""
    construction, _, size = args.one.partition(":")
    data = MVTecDataModule(root=str(args.root), category=args.category, image_size=args.size,
                           eval_batch_size=args.batch, num_workers=0,
                           val_fraction=args.val_fraction, verify_images=False)  # fmt: skip
    data.setup("fit")
    loader = data.bank_dataloader()
    torch.manual_seed(0)
    config = model_config(  # the default model with this bank (no size: h * w)
        f"model.input_size=[{args.size},{args.size}]",
        f"model/bank={construction}",
        f"model.bank.size={int(size) if size else 'null'}",
    )
    bank_cfg = config["bank"]
    backbone = backbone_config(args.backbone, args.random_weights)
    lit = CFALitModule.from_config(**{**config, "backbone": backbone})
    bank = lit.model.bank
    n_images = len(loader.dataset)

    pass_peak, select = 0.0, {}
    finalize = bank.finalize

    def measured_finalize(*a, **kw):  # the selection: its own time and peak
        nonlocal pass_peak
        pass_peak = status_mb("VmHWM")  # phi's pass and the pool so far
        reset_peak()
        start = time.perf_counter()
        finalize(*a, **kw)
        select.update(s=time.perf_counter() - start, peak=status_mb("VmHWM"))

    bank.finalize = measured_finalize  # an instance attribute: memory_bank.py is untouched
    rss_before = reset_peak()
    start = time.perf_counter()
    lit.build_bank(loader)
    build_s = time.perf_counter() - start
    peak = max(pass_peak, select["peak"])
    return {
        "backbone": args.backbone, "pretrained": lit.hparams.backbone["pretrained"],
        "construction": construction, "size": bank_cfg["size"], "centres": bank.n_centres,
        "dims": bank.dim, "pool": bank.pool_size(n_images) if bank.pooled else None,
        "images": n_images, "build_s": round(build_s, 2), "select_s": round(select["s"], 2),
        "rss_before_mb": round(rss_before), "peak_rss_mb": round(peak),
        "peak_above_mb": round(peak - rss_before),
        "pass_peak_above_mb": round(pass_peak - rss_before),
        "select_peak_above_mb": round(select["peak"] - rss_before),
        "estimate_mb": round(bank.build_bytes(n_images) / 2**20),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="tf_efficientnet_lite0",
                        help="a timm name of a conf/backbone group, e.g. wide_resnet50_2")  # fmt: skip
    parser.add_argument("--random-weights", action="store_true",
                        help="pretrained: false (time and memory do not depend on the weights)")  # fmt: skip
    parser.add_argument("--banks", nargs="+", default=["positional", "kmeans", "coreset"],
                        help="construction[:size], e.g. coreset:16384 (default size h*w)")  # fmt: skip
    parser.add_argument("--root", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--category", default="magnetic_tile")
    parser.add_argument("--size", type=int, default=256, help="input size (px)")
    parser.add_argument("--batch", type=int, default=16, help="images per step (data's eval)")
    parser.add_argument("--val-fraction", type=float, default=0.2,
                        help="held out of train/good (conf/data/shared.yaml: 0.2)")  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child: one bank, JSON to stdout
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.one:
        print(json.dumps(build_one(args)))
        return 0

    machine = f"{benchmark.machine(CPU)}, torch {torch.__version__}"
    print(f"# bank build on {args.category}, {args.backbone}, {args.size} px; {machine}")
    print("| " + " | ".join(FIELDS) + " |\n|" + "---|" * len(FIELDS), flush=True)
    child = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])]
    runs = []
    for spec in args.banks:
        done = subprocess.run([*child, "--one", spec], capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
            runs.append({"bank": spec, "error": last})
            print(f"| {spec} | error: {runs[-1]['error']} |", flush=True)
            continue
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print("| " + " | ".join(str(runs[-1][k]) for k in FIELDS) + " |", flush=True)
    if args.json:
        record = {"machine": machine, "category": args.category, "size": args.size,
                  "val_fraction": args.val_fraction, "batch": args.batch, "runs": runs}  # fmt: skip
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 1 if any("error" in r for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
