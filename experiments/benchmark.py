"""Speed and memory of CFA: the default ("fast") path against the naive reference, in one process.

For each backbone and precision: one model (random weights, `pretrained: false`: speed does not
depend on them, and nothing is downloaded) and one batch of random images. "fast" is the default
path (a dense float32 search per block of patches, only the K + J selected distances recomputed
with gradients); "naive" materialises the full (patches x centres) distance tensor and
backpropagates through it. Rounds alternate fast and naive (train step, then inference step), so
that the drift of a shared machine hits both alike; img/s = batch / median step time.
Peak memory of a step: on CUDA the allocator's maximum; on CPU the process's peak RSS during that
step (reset before it through /proc/self/clear_refs, after returning freed heap to the system).
Before timing, fast and naive are compared on the same inputs (maps, loss gradients).

    python experiments/benchmark.py --quick    # make bench: 3 backbones, batch 2, fp32; ~170 CPU-s
    python experiments/benchmark.py            # the full grid
    python experiments/benchmark.py --device cuda --batch 32 --precision 32 bf16-mixed
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from cfa_lightning.models.backbone import Backbone
from cfa_lightning.models.cfa import CFA, CFAOutput
from cfa_lightning.models.distances import squared_distances

BACKBONES = ["resnet18", "tf_efficientnet_lite0", "wide_resnet50_2"]
FULL = {"backbones": BACKBONES, "size": 256, "batch": 8, "rounds": 3,
        "precisions": ["32", "bf16-mixed"]}  # fmt: skip
QUICK = {"backbones": BACKBONES, "size": 256, "batch": 2, "rounds": 1, "precisions": ["32"]}
# Fast and naive differ by float32 rounding of two summation orders; the naive gradient goes
# through the expanded form ||p||^2 + ||c||^2 - 2 p.c, whose cancellation alone reached 1.1e-3 on
# resnet18's random features (the fast path is checked against float64 brute force in
# tests/test_distances.py). Under mixed precision the maps stay float32, but the descriptor's
# weight gradient is computed in the autocast dtype, where two gradients of slightly different
# distances can round a step apart (2^-8 relative in bfloat16: 3.4e-3, 3.0e-3 and 4.5e-3 measured
# for resnet18, lite0 and wide_resnet50_2; 2^-11 in float16); the tolerance allows two steps more.
MAPS_TOLERANCE = 1e-4
GRAD_TOLERANCE = {"32": 2e-3, "bf16-mixed": 2e-3 + 2**-7, "16-mixed": 2e-3 + 2**-10}
AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


# ---- peak memory of one step -------------------------------------------------------------------


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak(device: torch.device) -> None:
    """Start a new peak: CUDA's allocator counter, or the process's peak RSS on Linux."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap back to the system: RSS = live data
        Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    except OSError:  # not glibc / not Linux: the peak then spans the whole process
        pass


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    return _status_mb("VmHWM")


# ---- the two paths ------------------------------------------------------------------------------


def build(name: str, size: int, device: torch.device) -> CFA:
    """A model with a bank from two random images (random backbone weights)."""
    torch.manual_seed(0)
    model = CFA(Backbone(name, pretrained=False), input_size=size).to(device)
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


def check_against_naive(model: CFA, images: torch.Tensor, autocast) -> dict[str, float]:
    """Max relative differences of maps, loss and gradients (descriptor weight, radius)."""
    with torch.no_grad():
        model.loss_fn.radius.fill_(1.0)  # both hinge terms active on random features
    grads = []
    for naive in (False, True):
        model.zero_grad()
        with autocast:
            loss, _ = model.loss(images, naive=naive)
        loss.backward()
        grads.append((loss.detach(), model.descriptor.coord_conv.weight.grad.clone(),
                      model.loss_fn.radius.grad.clone()))  # fmt: skip
    with torch.inference_mode(), autocast:
        fast_maps, naive_maps = model(images).maps, naive_forward(model, images).maps
    model.zero_grad()
    with torch.no_grad():
        model.loss_fn.radius.fill_(1e-5)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))

    return {
        "maps_rel": rel(fast_maps, naive_maps),
        "loss_rel": rel(grads[0][0], grads[1][0]),
        "grad_rel": max(rel(grads[0][1], grads[1][1]), rel(grads[0][2], grads[1][2])),
    }


def run_cell(name: str, size: int, batch: int, precision: str, device: torch.device,
             rounds: int) -> dict:  # fmt: skip
    """One (backbone, size, batch, precision): fast and naive alternating, train and inference."""
    model = build(name, size, device)
    images = torch.rand(batch, 3, size, size, device=device)
    dtype = AUTOCAST.get(precision)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
    check = check_against_naive(model, images[:1], autocast)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3,
                            amsgrad=True)  # fmt: skip

    def train(naive: bool) -> None:
        with autocast:
            loss, _ = model.loss(images, naive=naive)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def infer(naive: bool) -> None:
        with torch.inference_mode(), autocast:
            (naive_forward(model, images) if naive else model(images)).maps.sum().item()

    def measure(step, naive: bool) -> tuple[float, float]:
        reset_peak(device)
        start = time.perf_counter()
        step(naive)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, peak_mb(device)

    times = {(s, p): [] for s in ("train", "infer") for p in ("fast", "naive")}
    peaks = {key: 0.0 for key in times}
    for round_ in range(rounds + 1):  # round 0 warms up (allocator, kernels, caches)
        for stage, step in (("train", train), ("infer", infer)):
            for path in ("fast", "naive") if round_ % 2 == 0 else ("naive", "fast"):
                seconds, peak = measure(step, path == "naive")
                if round_ > 0:
                    times[stage, path].append(seconds)
                peaks[stage, path] = max(peaks[stage, path], peak)
    result = {"backbone": name, "size": size, "batch": batch, "precision": precision,
              "device": str(device), "rounds": rounds, "check": check}  # fmt: skip
    for (stage, path), ts in times.items():
        result[f"{stage}_{path}_ips"] = batch / statistics.median(ts)
        result[f"{stage}_{path}_peak_mb"] = peaks[stage, path]
    return result


# ---- the table ----------------------------------------------------------------------------------

HEADER = ("backbone", "px", "batch", "precision", "train img/s fast / naive", "train x",
          "infer img/s fast / naive", "infer x", "train peak MB fast / naive",
          "infer peak MB fast / naive", "max rel. diff (maps / grads)")  # fmt: skip


def row(r: dict) -> str:
    if "error" in r:
        cells = [r["backbone"], r["size"], r["batch"], r["precision"], f"error: {r['error']}"]
        return "| " + " | ".join(map(str, cells)) + " |"

    def pair(key: str, fmt: str) -> str:
        fast, naive = r[key.format("fast")], r[key.format("naive")]
        return f"{fast:{fmt}} / {naive:{fmt}}"

    cells = [
        r["backbone"], r["size"], r["batch"], r["precision"],
        pair("train_{}_ips", ".2f"), f"x{r['train_fast_ips'] / r['train_naive_ips']:.2f}",
        pair("infer_{}_ips", ".2f"), f"x{r['infer_fast_ips'] / r['infer_naive_ips']:.2f}",
        pair("train_{}_peak_mb", ".0f"), pair("infer_{}_peak_mb", ".0f"),
        f"{r['check']['maps_rel']:.1e} / {r['check']['grad_rel']:.1e}",
    ]  # fmt: skip
    return "| " + " | ".join(map(str, cells)) + " |"


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU threads"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="batch 2, one round, fp32 (make bench)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", nargs="+", choices=["32", *AUTOCAST], help="override")
    parser.add_argument("--backbones", nargs="+", help="override, e.g. resnet18 wide_resnet50_2")
    parser.add_argument("--size", type=int, help="override the input size (px)")
    parser.add_argument("--batch", type=int, help="override the batch size")
    parser.add_argument("--rounds", type=int, help="timed rounds per cell (after one warm-up)")
    parser.add_argument("--json", type=Path, help="also write all results to this file")
    args = parser.parse_args(argv)
    plan = dict(QUICK if args.quick else FULL)
    for key in ("precision", "backbones", "size", "batch", "rounds"):
        if getattr(args, key) is not None:
            plan["precisions" if key == "precision" else key] = getattr(args, key)
    device = torch.device(args.device)
    peak = "max allocated" if device.type == "cuda" else "peak RSS of the process during the step"
    print(f"# CFA fast vs naive on {machine(device)}; torch {torch.__version__}; random weights; "
          f"gamma_c = gamma_d = 1; {plan['rounds']} timed round(s), fast and naive alternating; "
          f"peak memory = {peak}\n")  # fmt: skip
    print("| " + " | ".join(HEADER) + " |")
    print("|" + "---|" * len(HEADER), flush=True)
    results = []
    for precision in plan["precisions"]:
        for name in plan["backbones"]:
            try:
                r = run_cell(name, plan["size"], plan["batch"], precision, device, plan["rounds"])
            except Exception as err:  # one cell's failure (out of memory, say) is a table row
                r = {"backbone": name, "size": plan["size"], "batch": plan["batch"],
                     "precision": precision, "error": f"{type(err).__name__}: {err}"[:200]}  # fmt: skip
            results.append(r)
            print(row(r), flush=True)
    bad = [r for r in results if "check" in r and (r["check"]["maps_rel"] > MAPS_TOLERANCE
           or r["check"]["grad_rel"] > GRAD_TOLERANCE[r["precision"]])]  # fmt: skip
    slower = [r for r in results if "check" in r and min(
        r["train_fast_ips"] / r["train_naive_ips"], r["infer_fast_ips"] / r["infer_naive_ips"]) < 1]  # fmt: skip
    print(f"\nfast vs naive: {len(bad)} cell(s) outside tolerance (maps {MAPS_TOLERANCE:.0e}, "
          f"gradients {', '.join(f'{p} {t:.1e}' for p, t in GRAD_TOLERANCE.items())}); "
          f"{len(slower)} cell(s) where fast is slower than naive in training or inference")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    errors = [r for r in results if "error" in r]
    return 1 if bad or errors else 0


if __name__ == "__main__":
    sys.exit(main())
