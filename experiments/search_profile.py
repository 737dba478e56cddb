"""The nearest-centre search alone, dense against pruned, and where each spends its time.

Trained-like features as in `benchmark.py --real`: the bank from the first 8 train images of an
MVTec-style category, `--train-steps` descriptor steps, then the patches of `--images` test
images. Prints, for k = K (inference) and k = K + J (training's selection), the best of `--reps`
alternating runs of each search, the share of centres whose distance was computed, that the
answers are equal, and with `--profile` the operators that took the time.

    python experiments/search_profile.py --real ../shared/data/cookies
    python experiments/search_profile.py --real ../shared/data/magnetic_tile --profile
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.profiler import profile

from benchmark import build_trained, real_images
from cfa_lightning.models.search import nearest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", type=Path, required=True, help="MVTec-style category folder")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--images", type=int, default=2, help="test images whose patches search")
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--profile", action="store_true", help="print the top operators")
    args = parser.parse_args()

    torch.manual_seed(0)
    device = torch.device("cpu")
    model = build_trained(args.backbone, args.size, device, args.real, args.train_steps)
    test = torch.cat([real_images(d, args.size, args.images)
                      for d in sorted((args.real / "test").iterdir()) if d.is_dir()])  # fmt: skip
    images = test[torch.randperm(len(test), generator=torch.Generator().manual_seed(0))]
    with torch.no_grad():
        p = model.flatten_patches(model.describe(images[: args.images]))
    bank, budget = model.bank, model.chunk_bytes
    dense, pruned = bank.search_index(pruned=False), bank.search_index(pruned=True)
    print(f"# {args.backbone} {args.size} px, {args.real}: {p.shape[0]} patches, "
          f"M = {bank.n_centres}, D' = {p.shape[1]}, k' = {int(bank.search_dims)}, "
          f"G = {int(bank.group_of.max()) + 1}; {torch.get_num_threads()} threads")  # fmt: skip
    for k in (model.K, model.K + model.J):
        ref, res = nearest(p, dense, k, budget), nearest(p, pruned, k, budget)
        best = {"dense": float("inf"), "pruned": float("inf")}
        for _ in range(args.reps):  # alternate, so that drift hits both alike
            for name, index in (("dense", dense), ("pruned", pruned)):
                start = time.perf_counter()
                nearest(p, index, k, budget)
                best[name] = min(best[name], time.perf_counter() - start)
        t_dense, t_pruned = best["dense"], best["pruned"]
        same = torch.equal(ref.values, res.values)
        print(f"k = {k}: dense {t_dense * 1e3:.1f} ms, pruned {t_pruned * 1e3:.1f} ms "
              f"(x{t_dense / t_pruned:.2f}); centres computed {res.stats.checked_fraction:.1%}, "
              f"patches dense {res.stats.dense_fraction:.1%}; equal values: {same}")  # fmt: skip
        if args.profile:
            for name, index in (("dense", dense), ("pruned", pruned)):
                with profile() as prof:
                    nearest(p, index, k, budget)
                print(f"\n{name}, k = {k}:")
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


if __name__ == "__main__":
    main()
