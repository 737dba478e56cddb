"""experiments/peer_speed.py without anomalib: its options, its table from made-up child results,
and the one line it prints when the peer environment is missing."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "peer_speed.py"
spec = importlib.util.spec_from_file_location("peer_speed", SCRIPT)
peer_speed = importlib.util.module_from_spec(spec)
spec.loader.exec_module(peer_speed)


def fake(side, backbone, phase, ips, peak, round_=0):
    return {"side": side, "backbone": backbone, "phase": phase, "ips": ips, "peak_rss_mb": peak,
            "round": round_, "threads": 2, "torch": "2.14.1", "settings": {"K": 1},
            "imports_rss_mb": 1000.0}  # fmt: skip


def test_defaults_and_overrides():
    args = peer_speed.parse_args([])
    assert args.backbones == ["resnet18", "wide_resnet50_2"]
    assert args.ours_only_backbones == ["tf_efficientnet_lite0"]
    assert (args.size, args.batch, args.threads, args.rounds, args.child) == (256, 8, 2, 2, None)
    args = peer_speed.parse_args(["--backbones", "resnet18", "--ours-only-backbones",
                                  "--size", "64", "--threads", "1", "--peer-python", "/x/python"])  # fmt: skip
    assert (args.backbones, args.ours_only_backbones, args.size) == (["resnet18"], [], 64)
    assert (args.threads, args.peer_python) == (1, "/x/python")
    assert args.ours_overrides == [] and list(peer_speed.ours_configs(args)) == ["ours"]
    args = peer_speed.parse_args(["--ours-overrides", "model/bank=positional", "model.K=3",
                                  "--ours-overrides", "model.gamma_d=2"])  # fmt: skip
    assert peer_speed.ours_configs(args) == {
        "ours": [], "ours model/bank=positional model.K=3": ["model/bank=positional", "model.K=3"],
        "ours model.gamma_d=2": ["model.gamma_d=2"]}  # fmt: skip


@pytest.mark.parametrize(
    "argv",
    [
        ["--rounds", "0"],
        ["--threads", "0"],
        ["--bank-images", "0"],
        ["--child", "peer"],
        ["--backbones", "resnet18", "--ours-only-backbones", "resnet18"],
    ],  # fmt: skip
)
def test_bad_options_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        peer_speed.parse_args(argv)
    assert "error:" in capsys.readouterr().err


def test_the_sides_alternate_and_ours_only_runs_alone():
    args = peer_speed.parse_args(["--backbones", "resnet18", "--rounds", "2"])
    runs = peer_speed.plan(args)
    assert runs[:2] == [(0, "resnet18", "train", "ours"), (0, "resnet18", "train", "peer")]
    assert runs[6] == (1, "resnet18", "train", "peer")  # round 2 starts with the peer
    lite0 = [r for r in runs if r[1] == "tf_efficientnet_lite0"]
    assert {r[3] for r in lite0} == {"ours"} and len(lite0) == 4  # 2 rounds x 2 phases


def test_more_configurations_of_ours_run_in_the_same_rounds():
    args = peer_speed.parse_args(["--backbones", "resnet18", "--ours-only-backbones",
                                  "--ours-overrides", "model/bank=positional"])  # fmt: skip
    runs = peer_speed.plan(args)
    label = "ours model/bank=positional"
    assert [r[3] for r in runs[:3]] == ["ours", label, "peer"]
    assert [r[3] for r in runs[6:9]] == ["peer", label, "ours"]  # round 2 reversed
    results = [fake("ours", "resnet18", "train", 2.0, 1200), fake(label, "resnet18", "train", 4.0, 1100),
               fake("peer", "resnet18", "train", 1.0, 2200)]  # fmt: skip
    lines = peer_speed.table(results, ["resnet18"], 256, 8, list(peer_speed.ours_configs(args)))
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [row[:6] for row in rows] == [["resnet18", "default", "256", "8", "2.00 / 1.00", "x2.00"],
                                         ["resnet18", "model/bank=positional", "256", "8", "4.00 / 1.00", "x4.00"]]  # fmt: skip


def test_table_medians_ratios_and_missing_sides():
    results = [
        fake("ours", "resnet18", "train", 2.0, 1200), fake("peer", "resnet18", "train", 1.0, 2400),
        fake("ours", "resnet18", "train", 4.0, 1300, 1), fake("peer", "resnet18", "train", 1.0, 2000, 1),
        fake("ours", "resnet18", "infer", 3.0, 1000), fake("peer", "resnet18", "infer", 6.0, 500),
        {"side": "peer", "backbone": "resnet18", "phase": "infer", "error": "boom", "round": 1},
        fake("ours", "tf_efficientnet_lite0", "train", 5.0, 900),
    ]  # fmt: skip
    lines = peer_speed.table(results, ["resnet18", "tf_efficientnet_lite0"], 256, 8)
    assert lines[0].startswith("| backbone | ours | px | batch | train img/s ours / peer")
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    # train: median 3.0 vs 1.0; peak: the max over rounds; errors are left out of the cells
    assert cells == ["resnet18", "default", "256", "8", "3.00 / 1.00", "x3.00", "3.00 / 6.00", "x0.50",
                     "1300 / 2400", "x0.54", "1000 / 500", "x2.00"]  # fmt: skip
    cells = [c.strip() for c in lines[3].strip("|").split("|")]
    assert cells[4:8] == ["5.00 / -", "-", "- / -", "-"]


def test_header_names_the_cpu_and_threads():
    ours = {**fake("ours", "resnet18", "train", 2.0, 1), "machine": "Some CPU, 2 CPUs, torch using 2 thread(s)"}  # fmt: skip
    text = peer_speed.header([ours], peer_speed.parse_args(["--rounds", "1"]))
    assert "Some CPU, 2 CPUs, torch using 2 thread(s)" in text and "ours: torch 2.14.1" in text
    assert "imports alone 1000 MB" in text


def test_missing_peer_environment_is_one_line(tmp_path):
    missing = tmp_path / "no-venv" / "bin" / "python"
    for how in (["--peer-python", str(missing)], []):
        env = {"CFA_PEER_PYTHON": str(missing), "PATH": "/usr/bin:/bin"}
        done = subprocess.run([sys.executable, str(SCRIPT), *how], capture_output=True, text=True,
                              env=env, cwd=tmp_path, timeout=60)  # fmt: skip
        out = (done.stdout + done.stderr).strip().splitlines()
        assert done.returncode != 0 and len(out) == 1, out
        assert "make peer-env" in out[0] and "anomalib==2.7.0" in out[0]
        assert str(missing) in out[0]
