"""Where the time of one inference goes, per stage, in PyTorch, onnxruntime and OpenVINO fp32.

    python experiments/runtime_profile.py [--backbones lite0 resnet18 wide_resnet50_2]
        [--batch 8] [--size 256] [--repeats 5] [--threads <cores>] [--nodes N]

The companion of `runtime_benchmark.py` (same models, same batch): it says why a runtime is or
is not faster than PyTorch. Stages: the backbone, the descriptor phi (a 1x1 convolution), the
distance search (the patches x centres ranking product, the top-k, the direct differences of
the candidates) and the maps (softmin, upsampling, blur, image score).
- PyTorch: each stage is timed on its own (median of --repeats calls on the same batch).
- onnxruntime: its profiler's per-node times (`enable_profiling`), summed per stage.
- OpenVINO: its per-node performance counters (`PERF_COUNT`), summed per stage.
Nodes are given a stage by the module in their name (`stage_of`); CFA's own nodes are the
search until its first upsampling, the maps from there on. The last column is
the product's share: the FLOPs of the search's ranking matmul against the backbone's and the
descriptor's, computed from shapes (multiply-adds x 2).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from cfa_lightning.deploy import OPENVINO_CONFIG, default_threads
from cfa_lightning.export import export_model
from cfa_lightning.models.maps import score_maps
from runtime_benchmark import BACKBONES, bank_images, build  # the speed table's models

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("backbone", "descriptor", "search", "maps")
MAP_START = ("Resize", "Interpolate")  # the first upsampling ends the search in a node list


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def pytorch_stages(model, batch: torch.Tensor, repeats: int) -> dict[str, float]:
    """Each stage on its own, fed the previous stage's output."""
    with torch.inference_mode():
        feats = model.backbone(batch)
        desc = model.descriptor(feats)  # (B, D', h, w)
        grid = (desc.shape[0], *desc.shape[-2:])  # (B, h, w)
        p = model.flatten_patches(desc)  # (N, D')
        sq, _ = model.nearest(p, model.K)  # (N, K)
        return {
            "backbone": median_ms(lambda: model.backbone(batch), repeats),
            "descriptor": median_ms(lambda: model.descriptor(feats), repeats),
            "search": median_ms(lambda: model.nearest(p, model.K), repeats),
            "maps": median_ms(lambda: score_maps(sq, grid, batch.shape[-2:], model.blur), repeats),
            "total": median_ms(lambda: model(batch), repeats),
            "nodes": [],
        }


def stage_of(name: str) -> str:
    """A node's stage from its name: backbone, descriptor, maps (the blur) or "cfa" (CFA's own
    nodes: the search, then the maps). ONNX names follow the module path ("/model/backbone/..."),
    OpenVINO's too ("__module.model.descriptor/..."), but the backbone's BatchNorm-folded nodes
    lose theirs ("Multiply_<n>"): anything outside CFA's own modules is the backbone."""
    for stage, key in (("descriptor", "descriptor"), ("maps", "blur"), ("backbone", "backbone")):
        if key in name:
            return stage
    return "cfa" if name.startswith(("/model/", "__module.model/", "__module/")) else "backbone"


def grouped(nodes: list[tuple[str, str, float]]) -> dict[str, float]:
    """(name, op type, ms) in execution order -> ms per stage."""
    out: dict[str, float] = defaultdict(float)
    seen_map = False
    for name, op, ms in nodes:
        stage = stage_of(name)
        seen_map = seen_map and stage != "backbone"  # the next call (profiles of several runs)
        if stage == "cfa":
            seen_map = seen_map or op in MAP_START
            stage = "maps" if seen_map else "search"
        out[stage] += ms
    return dict(out)


def onnxruntime_stages(path: Path, batch: np.ndarray, threads: int, repeats: int) -> dict:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    total = median_ms(lambda: session.run(None, {"images": batch}), repeats)
    options.enable_profiling = True
    options.profile_file_prefix = str(path.parent / "ort_profile")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    session.run(None, {"images": batch})  # warm-up, dropped below
    for _ in range(repeats):
        session.run(None, {"images": batch})
    events = json.loads(Path(session.end_profiling()).read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
    first_timed = sorted(e["ts"] for e in runs)[1]
    nodes = [
        (e["name"], e["args"].get("op_name", ""), e["dur"] / 1000 / repeats)
        for e in sorted(events, key=lambda e: e["ts"])
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= first_timed
    ]
    return {**grouped(nodes), "total": total, "nodes": slowest(nodes)}


def slowest(nodes: list[tuple[str, str, float]], n: int = 5) -> list[tuple[str, str, float]]:
    """The n nodes that took longest (ms summed over a call)."""
    total: dict[tuple[str, str], float] = defaultdict(float)
    for name, op, ms in nodes:
        total[(name, op)] += ms
    return [(name, op, ms) for (name, op), ms in sorted(total.items(), key=lambda t: -t[1])[:n]]


def openvino_stages(path: Path, batch: np.ndarray, threads: int, repeats: int) -> dict:
    import openvino as ov

    core = ov.Core()
    config = {**OPENVINO_CONFIG, "INFERENCE_NUM_THREADS": threads}
    compiled = core.compile_model(str(path), "CPU", config)
    total = median_ms(lambda: compiled(batch), repeats)
    compiled = core.compile_model(str(path), "CPU", {**config, "PERF_COUNT": True})
    request = compiled.create_infer_request()
    request.infer(batch)
    per_run: dict[str, list[float]] = defaultdict(list)
    nodes: list[tuple[str, str, float]] = []
    for _ in range(repeats):
        request.infer(batch)
        nodes = [
            (info.node_name, info.node_type, info.real_time.total_seconds() * 1000)
            for info in request.get_profiling_info()
            if info.status == info.Status.EXECUTED
        ]
        for stage, ms in grouped(nodes).items():
            per_run[stage].append(ms)
    medians = {s: statistics.median(v) for s, v in per_run.items()}
    return {**medians, "total": total, "nodes": slowest(nodes)}


def product_share(model, size: int) -> float:
    """FLOPs of the ranking product / (those + backbone convolutions + descriptor), per image."""
    flops: list[float] = []

    def count(module, inputs, output):
        w = module.weight
        flops.append(2 * output.numel() * w.shape[1] * w.shape[2] * w.shape[3])

    convs = [m for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    hooks = [m.register_forward_hook(count) for m in convs]
    with torch.no_grad():
        desc = model.descriptor(model.backbone(torch.zeros(1, 3, size, size)))
    for hook in hooks:
        hook.remove()
    m, dim = model.bank.centres.shape
    patches = desc.shape[-2] * desc.shape[-1]
    descriptor = 2.0 * patches * model.descriptor.coord_conv.weight[:, :, 0, 0].numel()
    search = 2.0 * patches * m * dim  # (h w patches) x (M centres) x D'
    return search / (search + descriptor + sum(flops))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--nodes", type=int, default=0, help="also print the N slowest nodes")
    parser.add_argument("--calibration", type=Path,
                        default=ROOT.parent / "shared/data/cookies/train/good")  # fmt: skip
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    size = (args.size, args.size)
    images = bank_images(args.calibration, size)
    batch = np.stack([images[i % len(images)] for i in range(args.batch)])
    print(f"torch {torch.__version__}, {args.threads} threads, {args.size} px, batch "
          f"{args.batch}: ms per batch by stage (share of the runtime's summed stages); "
          "total = median wall time of a whole call")  # fmt: skip
    print(f"{'backbone':16s}{'runtime':14s}" + "".join(f"{s:>16s}" for s in STAGES)
          + f"{'total':>10s}{'product FLOP share':>20s}")  # fmt: skip
    for backbone in args.backbones:
        module, _ = build(backbone, args.size, images, [])  # the default config's model
        share = product_share(module.model, args.size)
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            hp, data = dict(module.hparams), {"image_size": args.size}
            onnx = export_model(module.model, hp, data, "onnx", tmp / "onnx")
            xml = export_model(module.model, hp, data, "openvino", tmp / "ov")
            results = {
                "pytorch": pytorch_stages(module.model, torch.from_numpy(batch), args.repeats),
                "onnxruntime": onnxruntime_stages(onnx, batch, args.threads, args.repeats),
                "openvino fp32": openvino_stages(xml, batch, args.threads, args.repeats),
            }
        for runtime, ms in results.items():
            summed = sum(ms.get(s, 0.0) for s in STAGES)
            cells = "".join(f"{ms.get(s, 0.0):9.0f} ({100 * ms.get(s, 0.0) / summed:3.0f}%)"
                            for s in STAGES)  # fmt: skip
            print(f"{backbone:16s}{runtime:14s}{cells}{ms['total']:10.0f}{share:19.0%}", flush=True)
            for name, op, node_ms in ms["nodes"][: args.nodes]:
                print(f"{'':30s}{node_ms:9.0f} ms  {op}  {name}")


if __name__ == "__main__":
    main()
