"""The benchmark scripts run (tiny sizes on CPU); the full-size runs are measured by hand (benchmarks/RESULTS.md)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from simpool.data import FASHION_MNIST_DIR
from tests.helpers import REPO


def run_script(*args: str, timeout: int = 300) -> str:
    result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_train_step_benchmark_runs_on_cpu():
    out = run_script("benchmarks/train_step.py", "--tiny", "--cases", "vit_small_simpool", "--steps", "2",
                     "--warmup", "1", "--local_crops", "2")
    assert "ratio ours/reference" in out


@pytest.mark.slow
def test_knn_benchmark_agrees_with_reference():
    out = run_script("benchmarks/knn.py", "--n_train", "2000", "--n_test", "500", "--classes", "10")
    assert "100.00" in out


@pytest.mark.slow
def test_data_pipeline_benchmark_runs():
    out = run_script("benchmarks/data_pipeline.py", "--rounds", "1", "--images", "2")
    assert "reference" in out


def test_end_to_end_benchmark_reads_the_trainers_throughput():
    """Both pipelines train from a JPEG folder through train_dino.py and the script parses the trainer's reports."""
    out = run_script("benchmarks/train_e2e.py", "--tiny", "--device", "cpu", "--batch", "4", "--num_workers", "0",
                     "--steps", "2", "--warmup_steps", "1", "--log_every", "1", "--copies", "2")
    rows = {line.split()[0]: float(line.split()[1]) for line in out.splitlines() if line.startswith(("gpu ", "cpu "))}
    assert set(rows) == {"gpu", "cpu"} and all(rate > 0 for rate in rows.values()), out
    assert "ratio gpu/cpu pipeline" in out


@pytest.mark.skipif(not FASHION_MNIST_DIR.joinpath("t10k-images-idx3-ubyte.gz").is_file(),
                    reason="Fashion-MNIST missing: apt-get install dataset-fashion-mnist")
def test_attention_quality_benchmark_trains_both_regimes_and_reports_margins(tmp_path):
    out = run_script("benchmarks/attention_quality.py", "--quick", "--val_images", "40", "--test_images", "8",
                     "--out_dir", str(tmp_path))
    results = json.loads((tmp_path / "results.json").read_text())
    assert {(run["regime"], run["mode"]) for run in results["runs"]} == {
        (regime, mode) for regime in ("dino", "supervised") for mode in ("official", "simpool")}
    for name in ("dino: simpool, map a", "supervised: official, head-average map", "untrained: simpool, map a"):
        assert name in out and 0.0 <= results["summary"][name]["jaccard_mass"]["mean"] <= 1.0
    assert len(results["margins"]) == 4 and "one seed" in results["margins"][0]
    for run in results["runs"]:  # what the features encode: item class and background photo, 20-NN top-1 in %
        assert all(0.0 <= value <= 100.0 for state in run["encodes"].values() for value in state.values())
    assert "photo 20-NN" in out
    assert (tmp_path / "voc_seed0.png").is_file()


def test_profile_step_groups_the_step_time():
    out = run_script("benchmarks/profile_step.py", "--tiny", "--device", "cpu", "--steps", "1", "--warmup", "1",
                     "--local_crops", "2", "--top", "5")
    shares = {line.rsplit(None, 1)[0].strip(): float(line.rsplit(None, 1)[1].rstrip("%"))
              for line in out.splitlines() if line.endswith("%") and not line.startswith(("|", "-"))}
    assert "matmul / linear / conv" in shares and shares["matmul / linear / conv"] > 0, out
    assert abs(sum(shares.values()) - 100.0) < 0.5, shares


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("strace"), reason="counts file opens with strace (apt-get install strace)")
def test_data_sources_benchmark_runs(tmp_path):
    out = run_script("benchmarks/data_sources.py", "--root", str(tmp_path), "--images", "400", "--classes", "4",
                     "--throughput_images", "128", "--repeats", "1")
    assert "shard index" in out and "shards: 0 opens" in out and "folder: 1000 opens" in out
