"""Speed and memory of CFA: the default ("fast") path against the naive reference, in one process.

For each backbone and precision: one batch of random images, one backbone (random weights,
`pretrained: false`: speed does not depend on them, and nothing is downloaded) and one model per
memory bank on that shared backbone: the default bank (positional, h * w centres) and, with `--bank`,
a kmeans or coreset bank of `--bank-size` centres beside it. Every bank is built by the real
MemoryBank code from `--bank-images` random images (not the timed batch); that build (update and
finalize, not describing the images) is timed on its own and kept out of the steps' timings.
"fast" is the default path (a dense float32 search per block of patches, only the K + J selected
distances recomputed with gradients); "naive" materialises the full (patches x centres) distance
tensor and backpropagates through it. Rounds alternate every (bank, path) pair, forwards then
backwards (train step, then inference step), so that the drift of a shared machine hits all alike;
img/s = batch / median step time.
Peak memory of a step: on CUDA the allocator's maximum; on CPU the process's peak RSS during that
step (reset before it through /proc/self/clear_refs, after returning freed heap to the system).
Every bank's model stays resident, so a peak also holds the other banks' centres (M x D' floats).
Before timing, fast and naive are compared on the same inputs (maps, loss gradients).

    python experiments/benchmark.py --quick    # make bench: 3 backbones, batch 2, fp32; ~170 CPU-s
    python experiments/benchmark.py            # the full grid
    python experiments/benchmark.py --device cuda --batch 32 --precision 32 bf16-mixed
    python experiments/benchmark.py --bank coreset --bank-size 16384 --bank-images 8
    python experiments/benchmark.py --bank kmeans --bank-size 0.05   # a fraction of bank patches
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
from cfa_lightning.models.cfa import CFA, CFAOutput, settings_of
from cfa_lightning.models.distances import squared_distances
from cfa_lightning.models.lit_module import model_config
from cfa_lightning.models.loss import CFALoss
from cfa_lightning.models.maps import score_maps
from cfa_lightning.models.memory_bank import CONSTRUCTIONS, bank_size

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


def status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MB; NaN where there is none."""
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
    return status_mb("VmHWM")


# ---- the two paths ------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_random_bank(model: CFA, n_images: int, chunk: int) -> float:
    """Build the model's bank by the MemoryBank code from ``n_images`` random images (``chunk``
    at a time); returns the seconds of the build (update and finalize, describing not counted)."""
    try:
        model.check_bank_size(model.bank.centres_for(n_images))
    except ValueError as err:
        raise ValueError(f"{err} (benchmark: raise --bank-images or lower --bank-size)") from None
    device = model.bank.centres.device
    gen = torch.Generator().manual_seed(1)  # the same bank images for every bank
    seconds = 0.0
    model.bank.reset(n_images)
    with torch.no_grad():
        for first in range(0, n_images, chunk):
            images = torch.rand(min(chunk, n_images - first), 3, *model.input_size, generator=gen)
            desc = model.describe(images.to(device))  # (b, D', h, w)
            sync(device)
            start = time.perf_counter()
            model.bank.update(desc)
            if first + chunk >= n_images:
                model.bank.finalize()
            sync(device)
            seconds += time.perf_counter() - start
        # Break exact ties between neighbouring centres of an untrained net (see tests/test_cfa.py).
        model.bank.centres.add_(1e-2 * torch.randn_like(model.bank.centres))
    return seconds


def naive_forward(model: CFA, images: torch.Tensor) -> CFAOutput:
    """Scores from the full (N, M) distance tensor, materialised at once."""
    desc = model.describe(images)  # (B, D', h, w)
    b, _, h, w = desc.shape
    d = squared_distances(model.flatten_patches(desc), model.bank.centres)  # (N, M)
    nearest = torch.topk(d, model.K, dim=1, largest=False).values  # (N, K)
    return score_maps(nearest, (b, h, w), images.shape[-2:], model.blur)


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


def bank_group(construction: str, size: int | float | None) -> dict:
    """The model config's bank for ``construction`` (conf/model/bank/), with ``size`` (None:
    h * w)."""
    size_override = "null" if size is None else str(size)
    return model_config(f"model/bank={construction}", f"model.bank.size={size_override}")["bank"]


def bank_label(bank: dict) -> str:
    size = bank.get("size")
    return bank["construction"] + ("" if size is None else f" {size}")


def default_model() -> dict:
    """The flat model config the command line composes (conf/train.yaml), which every cell
    uses: its loss settings (K, J, ...), its search and the default taps (those of
    backbone=efficientnet_lite0; every shipped backbone has the same)."""
    return model_config("backbone=efficientnet_lite0")


def model_on(backbone: Backbone, config: dict, **values) -> CFA:
    """The pure CFA of the flat model ``config`` (``values`` replacing its keys) on a backbone
    that several models share (CFA.from_config would build one each)."""
    settings = {**config, **values}
    loss = CFALoss(**{key: settings[key] for key in settings_of(CFALoss)})
    return CFA(backbone, loss, **{key: settings[key] for key in settings_of(CFA)})


def run_cell(name: str, size: int, batch: int, precision: str, device: torch.device,
             rounds: int, banks: list[dict], bank_images: int,
             taps: list[int] | None = None) -> list[dict]:  # fmt: skip
    """One (backbone, size, batch, precision): a row per bank, every (bank, path) alternating in
    each round, train and inference. The first bank is the reference of the "vs h*w" ratios."""
    torch.manual_seed(0)
    config = default_model()
    settings = {k: v for k, v in config["backbone"].items() if k not in ("_target_", "name")}
    backbone = Backbone(
        name, **{**settings, "out_indices": taps or settings["out_indices"], "pretrained": False}
    )
    cell = {"backbone": name, "size": size, "batch": batch, "precision": precision,
            "device": str(device), "rounds": rounds, "bank_images": bank_images}  # fmt: skip
    rows, built, models = [], [], []
    for bank in banks:
        rows.append({**cell, "bank": bank_label(bank)})
        try:
            torch.manual_seed(0)  # the same phi for every bank
            # Made on the CPU, where CFA probes the shared backbone before any model moves it.
            built.append((rows[-1], model_on(backbone, config, input_size=size, bank=bank)))
        except Exception as err:  # a bank that cannot be made is a table row; the others run
            rows[-1]["error"] = f"{type(err).__name__}: {err}"[:300]
    for r, model in built:
        try:
            r["build_s"] = build_random_bank(model.to(device), bank_images, batch)
        except Exception as err:
            r["error"] = f"{type(err).__name__}: {err}"[:300]
            continue
        r["centres"] = model.bank.n_centres
        models.append((r, model))
    del built
    images = torch.rand(batch, 3, size, size, device=device)
    dtype = AUTOCAST.get(precision)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
    opts = []
    for r, model in models:
        r["check"] = check_against_naive(model, images[:1], autocast)
        opts.append(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                      lr=1e-3, amsgrad=True))  # fmt: skip

    def train(i: int, naive: bool) -> None:
        with autocast:
            loss, _ = models[i][1].loss(images, naive=naive)
        opts[i].zero_grad(set_to_none=True)
        loss.backward()
        opts[i].step()

    def infer(i: int, naive: bool) -> None:
        model = models[i][1]
        with torch.inference_mode(), autocast:
            (naive_forward(model, images) if naive else model(images)).maps.sum().item()

    def measure(step, i: int, naive: bool) -> tuple[float, float]:
        reset_peak(device)
        start = time.perf_counter()
        step(i, naive)
        sync(device)
        return time.perf_counter() - start, peak_mb(device)

    order = [(i, path) for i in range(len(models)) for path in ("fast", "naive")]
    times = {(i, s, p): [] for s in ("train", "infer") for i, p in order}
    peaks = {key: 0.0 for key in times}
    for round_ in range(rounds + 1):  # round 0 warms up (allocator, kernels, caches)
        for stage, step in (("train", train), ("infer", infer)):
            for i, path in order if round_ % 2 == 0 else order[::-1]:
                seconds, peak = measure(step, i, path == "naive")
                if round_ > 0:
                    times[i, stage, path].append(seconds)
                peaks[i, stage, path] = max(peaks[i, stage, path], peak)
    for (i, stage, path), ts in times.items():
        models[i][0][f"{stage}_{path}_ips"] = batch / statistics.median(ts)
        models[i][0][f"{stage}_{path}_peak_mb"] = peaks[i, stage, path]
    reference = rows[0] if "error" not in rows[0] else None
    for r, _ in models:
        if reference is not None and r is not reference:
            r["vs_reference"] = {stage: r[f"{stage}_fast_ips"] / reference[f"{stage}_fast_ips"]
                                 for stage in ("train", "infer")}  # fmt: skip
    return rows


# ---- the table ----------------------------------------------------------------------------------

HEADER = ("backbone", "px", "batch", "precision", "bank", "centres", "bank build s",
          "train img/s fast / naive", "train x", "infer img/s fast / naive", "infer x",
          "fast vs h*w (train / infer)", "train peak MB fast / naive",
          "infer peak MB fast / naive", "max rel. diff (maps / grads)")  # fmt: skip


def row(r: dict) -> str:
    if "error" in r:
        cells = [r["backbone"], r["size"], r["batch"], r["precision"], r.get("bank", ""),
                 r.get("centres", ""), f"error: {r['error']}"]  # fmt: skip
        return "| " + " | ".join(map(str, cells)) + " |"

    def pair(key: str, fmt: str) -> str:
        fast, naive = r[key.format("fast")], r[key.format("naive")]
        return f"{fast:{fmt}} / {naive:{fmt}}"

    vs = r.get("vs_reference")
    cells = [
        r["backbone"], r["size"], r["batch"], r["precision"], r["bank"], r["centres"],
        f"{r['build_s']:.2f}",
        pair("train_{}_ips", ".2f"), f"x{r['train_fast_ips'] / r['train_naive_ips']:.2f}",
        pair("infer_{}_ips", ".2f"), f"x{r['infer_fast_ips'] / r['infer_naive_ips']:.2f}",
        f"x{vs['train']:.2f} / x{vs['infer']:.2f}" if vs else "-",
        pair("train_{}_peak_mb", ".0f"), pair("infer_{}_peak_mb", ".0f"),
        f"{r['check']['maps_rel']:.1e} / {r['check']['grad_rel']:.1e}",
    ]  # fmt: skip
    return "| " + " | ".join(map(str, cells)) + " |"


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = None
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        model = names[0] if names else None
    cpu = model or platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} CPUs, torch using {torch.get_num_threads()} thread(s)"


def size_arg(text: str) -> int | float:
    """--bank-size: a whole number of centres ("16384") or a fraction of all bank patches ("0.1")."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    raise argparse.ArgumentTypeError(f"{text!r} is neither a number of centres nor a fraction")


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
    parser.add_argument("--bank", choices=CONSTRUCTIONS, default="positional",
                        help="a bank to time beside positional (h*w centres)")  # fmt: skip
    parser.add_argument("--bank-size", type=size_arg,
                        help="its centres: a count (16384) or a fraction of all bank patches "
                             "(0.1); default h*w")  # fmt: skip
    parser.add_argument("--bank-images", type=int,
                        help="random images every bank is built from (default: the batch size)")  # fmt: skip
    parser.add_argument("--taps", type=int, nargs="+",
                        help="backbone out_indices (default: the default config's, [2, 3])")  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write all results to this file")
    args = parser.parse_args(argv)
    plan = dict(QUICK if args.quick else FULL)
    for key in ("precision", "backbones", "size", "batch", "rounds"):
        if getattr(args, key) is not None:
            plan["precisions" if key == "precision" else key] = getattr(args, key)
    bank_images = plan["batch"] if args.bank_images is None else args.bank_images
    if bank_images < 1:
        parser.error(f"--bank-images {bank_images}: a bank needs at least one image")
    if args.bank == "positional" and args.bank_size is not None:
        parser.error("--bank-size sizes the bank timed beside positional: add --bank kmeans or "
                     "--bank coreset")  # fmt: skip
    try:
        bank_size(args.bank_size, args.bank, 1, 1)
    except ValueError as err:
        parser.error(f"--bank {args.bank} --bank-size {args.bank_size}: {err}")
    banks = [bank_group("positional", None)]
    if args.bank != "positional":
        banks.append(bank_group(args.bank, args.bank_size))
    device = torch.device(args.device)
    peak = "max allocated" if device.type == "cuda" else "peak RSS of the process during the step"
    print(f"# CFA fast vs naive on {machine(device)}; torch {torch.__version__}; random weights; "
          f"gamma_c = gamma_d = 1; {plan['rounds']} timed round(s), every bank and path "
          f"alternating; banks built from {bank_images} random image(s), build not in the steps; "
          f"peak memory = {peak}\n")  # fmt: skip
    print("| " + " | ".join(HEADER) + " |")
    print("|" + "---|" * len(HEADER), flush=True)
    results = []
    for precision in plan["precisions"]:
        for name in plan["backbones"]:
            try:
                rows = run_cell(name, plan["size"], plan["batch"], precision, device,
                                plan["rounds"], banks, bank_images, args.taps)  # fmt: skip
            except Exception as err:  # one cell's failure (out of memory, say) is a table row
                rows = [{"backbone": name, "size": plan["size"], "batch": plan["batch"],
                         "precision": precision, "bank": bank_label(bank),
                         "error": f"{type(err).__name__}: {err}"[:200]} for bank in banks]  # fmt: skip
            results.extend(rows)
            for r in rows:
                print(row(r), flush=True)
    bad = [r for r in results if "check" in r and (r["check"]["maps_rel"] > MAPS_TOLERANCE
           or r["check"]["grad_rel"] > GRAD_TOLERANCE[r["precision"]])]  # fmt: skip
    slower = [r for r in results if "check" in r and min(
        r["train_fast_ips"] / r["train_naive_ips"], r["infer_fast_ips"] / r["infer_naive_ips"]) < 1]  # fmt: skip
    print(f"\nfast vs naive: {len(bad)} row(s) outside tolerance (maps {MAPS_TOLERANCE:.0e}, "
          f"gradients {', '.join(f'{p} {t:.1e}' for p, t in GRAD_TOLERANCE.items())}); "
          f"{len(slower)} row(s) where fast is slower than naive in training or inference")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    errors = [r for r in results if "error" in r]
    return 1 if bad or errors else 0


if __name__ == "__main__":
    sys.exit(main())
