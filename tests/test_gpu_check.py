"""experiments/gpu_check.py end to end on the CPU with small sizes: every step runs and reports."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_every_step_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "experiments/gpu_check.py", "--small", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=3600)  # fmt: skip
    report = (out / "gpu_check.md").read_text()
    assert proc.returncode == 0, report + proc.stderr[-3000:]
    assert report.rstrip().endswith("0 step(s) failed")
    # 1. versions; no CUDA here
    assert re.search(r"torch \S+ \| timm \S+ \| pytorch_lightning \S+", report)
    assert "no CUDA device" in report
    # 2. a fast and naive cell for lite0 and wide_resnet50_2 in fp32 and bf16-mixed
    # (backbone | px | batch | precision | bank | centres | bank build s | train fast / naive | x)
    cells = re.findall(r"^\| (tf_efficientnet_lite0|wide_resnet50_2) \| 32 \| 1 \| (32|bf16-mixed) "
                       r"\| positional \| \d+ \| [\d.]+ \| [\d.]+ / [\d.]+ \| x[\d.]+ \|",
                       report, re.M)  # fmt: skip
    assert sorted(cells) == sorted((b, p) for b in ("tf_efficientnet_lite0", "wide_resnet50_2")
                                   for p in ("32", "bf16-mixed"))  # fmt: skip
    # 3. the bf16-mixed demo's test metrics beside fp32 scoring of its checkpoint
    rows = re.findall(r"^\| (test/\S+) \| ([\d.]+) \| ([\d.]+) \| (\S+) \|", report, re.M)
    names = {name for name, *_ in rows}
    assert {"test/image_AUROC", "test/pixel_AUROC", "test/pixel_AUPRO"} <= names
    for name, bf16, fp32, _ in rows:
        # the maps are float32 under bf16-mixed; the descriptor's bf16 rounding moves AUROC/AUPRO
        # by far less than this on 8 test images (a measure of ties, not of precision)
        assert abs(float(bf16) - float(fp32)) <= 1e-2 or "threshold" in name, (name, bf16, fp32)
    # 4. two sweep jobs, each with its wall time
    jobs = re.findall(r"^\| (\d+) \| ([\d.]+) \|$", report, re.M)
    assert len(jobs) == 2 and all(float(wall) > 0 for _, wall in jobs)
    assert len(re.findall(r"^\| \d+_\S* \| ok \| [\d.]+ \|$", report, re.M)) == 2
