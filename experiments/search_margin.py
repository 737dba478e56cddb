"""How many extra candidates the dense search needs when the ranking product loses precision.

`models/distances.py` ranks centres with the expanded form, keeps the k + MARGIN best and
recomputes those as direct differences. In float32 the ranking is nearly exact; TF32 (10-bit
mantissa) and bf16 (7-bit) matmul inputs, as CUDA may use under
`set_float32_matmul_precision("high"/"medium")`, misrank near-ties. This script emulates them by
rounding the product's inputs, and counts the patches whose k nearest centres (compared by
float64 distance, so exact ties do not count) differ from float64 brute force, per margin.

Features are trained-like: lite0 (real ImageNet weights) on one MVTec-style category, bank from
8 train images, `--steps` AdamW steps of CFA training, patches of the first `--test-images`
defective test images (every test folder but good, in name order).

    python experiments/search_margin.py --real ../shared/data/cookies
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cfa_lightning.models.distances import build_index, direct_sq_distances
from cfa_lightning.models.lit_module import CFALitModule, model_config


def images(folders: list[Path], size: int, n: int) -> torch.Tensor:
    files = [f for folder in folders for f in sorted(folder.glob("*.png"))][:n]
    if not files:
        raise SystemExit(f"no .png images in {', '.join(map(str, folders))}")
    arrays = [np.array(Image.open(f).convert("RGB").resize((size, size))) for f in files]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255  # (n, 3, S, S)


def tf32(x: torch.Tensor) -> torch.Tensor:
    """float32 rounded to nearest with a 10-bit mantissa (TF32's), as a float32 tensor."""
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def bf16(x: torch.Tensor) -> torch.Tensor:
    return x.bfloat16().float()


def wrong_rows(p, index, k, margin, rounding, d64) -> int:
    """Patches whose k nearest (by float64 distance) differ from brute force; d64 (N, M)."""
    x = rounding(p - index.mean)
    y = rounding(index.centred)
    ranking = index.centred_sq.unsqueeze(0) - 2.0 * (x @ y.t())  # float32 accumulation
    cand = torch.topk(ranking, min(k + margin, ranking.shape[1]), dim=1, largest=False).indices
    d = direct_sq_distances(p, index.centres, cand)
    idx = cand.gather(1, torch.topk(d, k, dim=1, largest=False).indices)
    got = d64.gather(1, idx).sort(1).values
    ref = d64.topk(k, dim=1, largest=False).values
    return int((~torch.isclose(got, ref, rtol=1e-6, atol=1e-9)).any(dim=1).sum())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", type=Path, required=True, help="an MVTec-style category folder")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--test-images", type=int, default=2)
    parser.add_argument("--roundings", nargs="+", default=["float32", "TF32", "bf16"])
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    # lite0 at three taps, the positional bank and K = 3: the model its figures were measured on
    config = model_config("backbone=efficientnet_lite0", "backbone.out_indices=[1,2,3]",
                          f"model.input_size=[{args.size},{args.size}]", "model/bank=positional",
                          "model.K=3")  # fmt: skip
    model = CFALitModule.from_config(**config).model
    train = images([args.real / "train" / "good"], args.size, 8)
    with torch.no_grad():
        model.bank.update(model.describe(train))
    model.bank.finalize()
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-3)
    for step in range(args.steps):
        loss, _ = model.loss(train[(step % 2) * 4 : (step % 2) * 4 + 4])
        opt.zero_grad()
        loss.backward()
        opt.step()
    defects = sorted(d for d in (args.real / "test").iterdir() if d.is_dir() and d.name != "good")
    test = images(defects, args.size, args.test_images)
    with torch.no_grad():
        p = model.flatten_patches(model.describe(test)).float()
    index = build_index(model.bank.centres)
    d64 = torch.cdist(p.double(), index.centres.double()).pow(2)  # (N, M) float64 oracle
    print(f"{args.real.name}, lite0, {args.size} px, {args.steps} training steps: "
          f"{p.shape[0]} patches, {index.centres.shape[0]} centres, D' = {p.shape[1]}")  # fmt: skip
    print("| ranking inputs | k | margin 0 | 2 | 4 | 8 | 16 |  (patches with a wrong k-set)")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    roundings = {"float32": lambda t: t, "TF32": tf32, "bf16": bf16}
    for name in args.roundings:
        rounding = roundings[name]
        for k in (3, 6):
            counts = [wrong_rows(p, index, k, m, rounding, d64) for m in (0, 2, 4, 8, 16)]
            print(f"| {name} | {k} | " + " | ".join(map(str, counts)) + " |")


if __name__ == "__main__":
    main()
