"""What INT8 costs: the test metrics of one checkpoint in PyTorch, onnxruntime, OpenVINO fp32
and OpenVINO INT8 (NNCF, calibrated on train/good), on the same test batches.

    python experiments/int8_accuracy.py --ckpt <last.ckpt> [--scopes backbone all] [--out DIR]

The test protocol of `cfa-train` (the data module's test set, maps at the model resolution,
image/pixel AUROC and AUPRO of metrics.AnomalyMetrics); only the runtime changes. Prints one row
per variant and the change against PyTorch; writes int8_accuracy.json under --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from cfa_lightning.checkpoint import load_checkpoint
from cfa_lightning.deploy import load_runtime
from cfa_lightning.export import ExportableCFA, export
from cfa_lightning.metrics import AnomalyMetrics
from cfa_lightning.models.lit_module import CFALitModule

KEYS = ("image_AUROC", "pixel_AUROC", "pixel_AUPRO")


def test_batches(ckpt: dict, every: int):
    """The checkpoint's test set (every `every`-th image: a subset spread over all folders)."""
    from torch.utils.data import DataLoader, Subset

    from cfa_lightning.data import MVTecDataModule

    data = dict(ckpt["datamodule_hyper_parameters"])
    keep = ("root", "category", "image_size", "crop_size", "val_fraction", "split_seed")
    dm = MVTecDataModule(**{k: data[k] for k in keep if k in data}, eval_batch_size=8,
                         num_workers=0, verify_images=False)  # fmt: skip
    dm.setup("test")
    subset = Subset(dm.test_set, range(0, len(dm.test_set), every))
    yield from DataLoader(subset, batch_size=8, shuffle=False)


def evaluate(run, batches) -> tuple[dict[str, float], float]:
    """run: (B, 3, h, w) float32 numpy -> [scores, normalized, maps]; metrics and seconds."""
    metric, seconds = AnomalyMetrics(), 0.0
    for batch in batches:
        start = time.perf_counter()
        scores, _, maps = run(batch["image"].numpy())
        seconds += time.perf_counter() - start
        metric.update(torch.as_tensor(scores), batch["label"], torch.as_tensor(maps),
                      batch["mask"][:, 0])  # fmt: skip
    result = metric.compute()
    return {k: float(result[k]) for k in KEYS}, seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, type=Path)
    parser.add_argument("--scopes", nargs="+", default=["backbone", "all"])
    parser.add_argument("--every", type=int, default=1, help="every n-th test image (a subset)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-pytorch", action="store_true",
                        help="leave PyTorch out; onnxruntime fp32 (parity 1e-6) is the reference")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out or args.ckpt.parent / "int8_accuracy"
    ckpt = load_checkpoint(args.ckpt)
    batches = list(test_batches(ckpt, args.every))
    n = sum(len(b["image"]) for b in batches)
    wrapper = ExportableCFA(CFALitModule.from_checkpoint_dict(ckpt, args.ckpt).model).eval()

    def pytorch(x):
        with torch.inference_mode():
            return [t.numpy() for t in wrapper(torch.from_numpy(x))]

    variants = {} if args.no_pytorch else {"pytorch": pytorch}
    export(args.ckpt, "onnx", out / "onnx")
    variants["onnxruntime fp32"] = load_runtime(
        "onnxruntime", out / "onnx/model.onnx", args.threads
    )
    export(args.ckpt, "openvino", out / "openvino")
    variants["openvino fp32"] = load_runtime("openvino", out / "openvino/model.xml", args.threads)
    for scope in args.scopes:
        folder = out / f"openvino_int8_{scope}"
        export(args.ckpt, "openvino", folder, quantize="int8", quantize_scope=scope)
        variants[f"openvino int8 ({scope})"] = load_runtime(
            "openvino", folder / "model.xml", args.threads
        )
    rows = {}
    for name, run in variants.items():
        metrics, seconds = evaluate(run, batches)
        rows[name] = {**metrics, "img_per_s": n / seconds}
    ref = next(iter(rows.values()))  # PyTorch, else onnxruntime fp32
    print(f"{args.ckpt}  test images: {n}{f' (every {args.every}th)' if args.every > 1 else ''}")
    print(f"{'variant':26s}" + "".join(f"{k:>13s}" for k in KEYS) + f"{'img/s':>8s}  change")
    for name, row in rows.items():
        change = max(ref[k] - row[k] for k in KEYS)  # the largest drop of the three metrics
        print(f"{name:26s}" + "".join(f"{row[k]:13.4f}" for k in KEYS)
              + f"{row['img_per_s']:8.1f}  worst loss {change:+.4f}")  # fmt: skip
    (out / "int8_accuracy.json").write_text(
        json.dumps(
            {"ckpt": str(args.ckpt), "test_images": n, "every": args.every, "rows": rows}, indent=2
        )
        + "\n"  # fmt: skip
    )


if __name__ == "__main__":
    main()
