"""The paper's networks through every tool, at 224 px, as a user types the commands (``make test-paper``).

Every other test runs tiny networks at 16-64 px; these run ViT-S/16 (SimPool and official), ResNet-50 and
ConvNeXt-S, random-initialised and trained two DINO steps here, and the reference code's own checkpoints (the
fixtures), through each command-line tool as a subprocess from the repository root: ``train_dino.py`` (step 1,
stop, relaunch: step 2), ``eval_knn.py``, ``eval_linear.py``, the segmentation probe, ``finetune.py``,
``utils/export_backbone.py --onnx`` (onnxruntime against torch at 224x224 and 160x224), ``load_backbone`` and
``torch.hub.load``, ``utils/visualize_attention.py --pca``, the attention scores, ``utils/plot_log.py``, SimPool's
tables (``simpool-localization``, ``simpool-object-discovery``, ``simpool-background-robustness`` with its probe)
and DINO's other evaluators (``simpool-retrieval``, ``simpool-copy-detection``, ``simpool-video-segmentation``),
each on data generated at 224 px in its authors' layout.

Data: a 224x256 ImageFolder of fashion-on-photos in two classes (2 train + 2 val images each) and
``fashion-on-photos:4``. The commands run two at a time, one thread each (2 cores), in a pool that starts, when the
module's first test asks, every command the selected tests need (each tool waits for the run that trains its
network); each test then asserts on its command's exit code, output and files.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image

from simpool.data.generated.image_folder import image_folder_class_names, write_image_folder
from tests.helpers import FIXTURE_DIRS, REPO, onnx_error

try:
    import onnxruntime  # noqa: F401  (onnx_error runs it; checked here so the tier fails or skips at once)
except ImportError:  # the [onnx] extra; `make install` (and so CI) installs it, where a skip would hide a gap
    if os.environ.get("CI"):
        raise
    pytest.skip("onnxruntime is not installed: pip install -e '.[onnx]'", allow_module_level=True)

FASHION = Path("/usr/share/datasets/fashion-mnist")
pytestmark = [
    pytest.mark.paper,
    pytest.mark.timeout(1800),  # a test may wait for the commands queued before its own
    pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").is_file() and not os.environ.get("CI"),
                       reason="Debian package dataset-fashion-mnist is not installed"),
]

WORKERS = 2  # commands at a time; each single-threaded
COMMAND_TIMEOUT = 900

NETWORKS = {  # the networks of the paper and the README, as train_dino.py takes them
    "vit_small_simpool": ["--arch", "vit_small", "--patch_size", "16", "--mode", "simpool"],
    "vit_small_official": ["--arch", "vit_small", "--patch_size", "16", "--mode", "official"],
    "resnet50": ["--arch", "resnet50", "--mode", "simpool"],
    "convnext_small": ["--arch", "convnext_small", "--mode", "simpool"],
}
EMBED_DIM = {"vit_small_simpool": 384, "vit_small_official": 384, "resnet50": 2048, "convnext_small": 768}
DINO_FLAGS = ["--out_dim", "256", "--head_hidden_dim", "256", "--head_bottleneck_dim", "64",
              "--batch_size_per_gpu", "2", "--local_crops_number", "2", "--num_workers", "0"]

# Checkpoints written by the reference code (tests/conftest.py finds them) and the flags the tools need for them.
REFERENCE = {
    "reference_vit_simpool": ("vit_simpool_dino_checkpoint.pth",
                              ["--model_overrides", "depth=2", "embed_dim=192", "num_heads=3"]),
    "reference_resnet": ("resnet_simpool_teacher.pth",
                         ["--arch", "resnet18", "--mode", "simpool", "--model_overrides", "layers=[1,1,1,1]"]),
    "reference_convnext": ("convnext_simpool_teacher.pth",
                           ["--arch", "convnext_tiny", "--mode", "simpool", "--gamma", "None", "--model_overrides",
                            "depths=[1,1,1,1]", "dims=[32,64,128,256]"]),
}
REFERENCE_TOOLS = {"reference_vit_simpool": ["export"],
                   "reference_resnet": ["eval_knn", "export", "visualize", "attention"],
                   "reference_convnext": ["eval_knn", "export", "visualize", "attention"]}
ONNX_SHAPES = [(2, 3, 224, 224), (1, 3, 160, 224)]


# ------------------------------------------------------------------------------------------------------------
# running the commands
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ran:
    """One finished command."""

    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def ok(self) -> Ran:
        assert self.returncode == 0, (f"`python {' '.join(self.argv)}` exited {self.returncode} after "
                                      f"{self.seconds:.0f} s:\n{self.stderr[-4000:]}")
        return self


def python(*argv: str | Path) -> Ran:
    """``python ARGV`` from the repository root, as a user types it (this checkout's simpool, one thread)."""
    argv = [str(a) for a in argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    start = time.monotonic()
    done = subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT)
    return Ran(argv, done.returncode, done.stdout, done.stderr, time.monotonic() - start)


def write_layouts(root: Path) -> dict[str, Path]:
    """The evaluators' data sets, generated at 224 px in their authors' layouts (a few images each)."""
    from simpool.data.generated.bg_challenge import write_bg_challenge
    from simpool.data.generated.copydays import write_copydays_style
    from simpool.data.generated.davis import write_davis_style
    from simpool.data.generated.revisitop import write_revisitop_style
    from simpool.data.generated.voc_detection import write_voc_detection
    from simpool.data.generated.wsol import write_wsol

    images, metadata = write_wsol(root / "wsol", 4, image_size=224)
    write_revisitop_style(root / "revisitop", num_queries=2, easy=1, hard=1, junk=1, negatives=2, long_side=224)
    write_davis_style(root / "davis", num_videos=1, num_frames=3, size=(224, 256))
    return {"wsol_images": images, "wsol_metadata": metadata, "voc": write_voc_detection(root / "voc", 4, 224),
            "in9": write_bg_challenge(root / "in9", n_val=9, n_train=9, image_size=224),
            "revisitop": root / "revisitop", "davis": root / "davis",
            "copydays": write_copydays_style(root / "copydays", num_originals=2, strong_per_original=1,
                                             distractors=2, whitening=4, size=(224, 256), jpeg_qualities=(50,),
                                             crops=(50,))}


def tool_argv(tool: str, weights: Path, flags: list[str], out: Path, data: Path) -> list[str | Path]:
    """The command line of ``tool`` on ``weights`` (with the model ``flags`` they need), writing under ``out``."""
    images = ["--data_path", data, "--num_workers", "0", "--batch_size_per_gpu", "4"]
    layouts = {name: data.parent / "layouts" / name for name in ("wsol", "voc", "in9", "revisitop", "davis")}
    quiet = ["--num_workers", "0", "--no_progress"]
    return {
        "eval_knn": ["eval_knn.py", "--pretrained_weights", weights, *flags, *images, "--nb_knn", "1", "2",
                     "--output_dir", out],
        "eval_linear": ["eval_linear.py", "--pretrained_weights", weights, *flags, *images, "--epochs", "1",
                        "--num_labels", "2", "--output_dir", out],
        "segmentation": ["-m", "simpool.evaluation.segmentation", "--pretrained_weights", weights, *flags,
                         "--data_path", "fashion-on-photos:4", "--image_size", "224", "--epochs", "1",
                         "--num_workers", "0", "--batch_size_per_gpu", "4", "--output_dir", out],
        "finetune": ["finetune.py", "--pretrained_weights", weights, *flags, "--data_path", data, "--input_size",
                     "224", "--batch_size_per_gpu", "2", "--num_workers", "0", "--epochs", "1", "--warmup_epochs",
                     "0", "--exit_after_iterations", "1", "--output_dir", out],
        "export": ["utils/export_backbone.py", weights, out, *flags, "--onnx"],
        "visualize": ["utils/visualize_attention.py", "--pretrained_weights", weights, *flags, "--image_path",
                      data / "val" / image_folder_class_names(2)[1], "--output_dir", out, "--pca"],
        "attention": ["-m", "simpool.evaluation.attention", "--pretrained_weights", weights, *flags, "--data_path",
                      "fashion-on-photos:4", "--image_size", "224", "--output", out / "attention.json"],
        "localization": ["-m", "simpool.evaluation.run_localization", "--pretrained_weights", weights, *flags,
                         "--data_path", layouts["wsol"] / "images", "--metadata",
                         layouts["wsol"] / "metadata" / "FOP" / "test", "--image_size", "224", "--figures", "1",
                         *quiet, "--output_dir", out],
        "object_discovery": ["-m", "simpool.evaluation.run_object_discovery", "--pretrained_weights", weights, *flags,
                             "--data_path", layouts["voc"] / "VOCdevkit" / "VOC2007", "--figures", "1", *quiet,
                             "--output_dir", out],
        "retrieval": ["-m", "simpool.evaluation.run_retrieval", "--pretrained_weights", weights, *flags,
                      "--data_path", layouts["revisitop"], "--imsize", "224", "--num_workers", "0",
                      "--output_dir", out],
        "copy_detection": ["-m", "simpool.evaluation.run_copy_detection", "--pretrained_weights", weights, *flags,
                           "--data_path", data.parent / "layouts" / "copydays" / "copydays", "--whitening_path",
                           data.parent / "layouts" / "copydays" / "whitening", "--distractors_path",
                           data.parent / "layouts" / "copydays" / "distractors", "--imsize", "224",
                           "--num_workers", "0", "--output_dir", out],
        "video_segmentation": ["-m", "simpool.evaluation.run_video_segmentation", "--pretrained_weights", weights,
                               *flags, "--data_path", layouts["davis"], "--short_side", "224", "--output_dir", out],
        "plot_log": ["utils/plot_log.py", weights.parent, "--out", out / "curves.png"],
    }[tool]


def background_robustness(weights: Path, flags: list[str], out: Path, in9: Path) -> Ran:
    """The linear probe of ``eval_linear.py`` on IN-9's original images, then the tool on every variant."""
    probe = python("eval_linear.py", "--pretrained_weights", weights, *flags, "--data_path", in9 / "original",
                   "--image_size", "224", "--epochs", "1", "--num_workers", "0", "--batch_size_per_gpu", "9",
                   "--output_dir", out / "probe")
    if probe.returncode != 0:
        return probe
    return python("-m", "simpool.evaluation.run_background_robustness", "--pretrained_weights", weights, *flags,
                  "--probe", out / "probe", "--data_path", in9, "--image_size", "224", "--batch_size_per_gpu", "9",
                  "--num_workers", "0", "--no_progress", "--output_dir", out)


TOOLS = ["eval_knn", "eval_linear", "segmentation", "finetune", "export", "visualize", "attention", "localization",
         "object_discovery", "background_robustness", "retrieval", "copy_detection", "video_segmentation", "plot_log"]
# test function -> the job it reads: ("train" | tool, network) or (tool, reference checkpoint)
JOB_OF_TEST = {"test_train_dino_two_steps_stop_and_resume": "train", "test_load_backbone_and_torch_hub": "export",
               **{f"test_{tool}": tool for tool in TOOLS}}


class Tier:
    """A pool of ``WORKERS`` threads that run the commands; ``result(job)`` waits for one.

    Training jobs are queued before every tool job and never wait, so a tool job that waits for its network's
    training always waits for a running (or finished) one: the pool cannot deadlock.
    """

    def __init__(self, root: Path, data: Path, reference_dir: Path | None) -> None:
        self.root, self.data, self.reference_dir = root, data, reference_dir
        self.pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="paper")
        self.jobs: dict[tuple[str, str], Future] = {}

    def start(self, wanted: set[tuple[str, str]]) -> None:
        for net in NETWORKS:
            if any(name == net for _, name in wanted):
                self._submit(("train", net), lambda net=net: self._train(net))
        for job in sorted(wanted, key=lambda j: (j[1] in NETWORKS, j[1], j[0])):  # reference jobs fill gaps early
            if job[0] != "train":
                self._submit(job, lambda job=job: self._tool(*job))

    def _submit(self, job: tuple[str, str], work: Callable[[], object]) -> None:
        if job not in self.jobs:
            self.jobs[job] = self.pool.submit(work)

    def result(self, job: tuple[str, str]):
        if job not in self.jobs:  # a test outside the planned set (e.g. selected by a plugin): run it now
            self.start({job})
        return self.jobs[job].result()

    def timings(self, wall: float) -> dict[str, float]:
        """Seconds per finished command (two per training job), and the wall time of the whole tier."""
        seconds = {"wall": round(wall, 1)}
        for (job, name), future in self.jobs.items():
            if future.done() and not future.cancelled() and future.exception() is None:
                ran = future.result()
                for i, one in enumerate(ran if isinstance(ran, tuple) else (ran,)):
                    seconds[f"{job}{i + 1 if isinstance(ran, tuple) else ''} {name}"] = round(one.seconds, 1)
        return seconds

    def checkpoint(self, net: str) -> Path:
        return self.root / net / "train" / "checkpoint.pth"

    def _train(self, net: str) -> tuple[Ran, Ran]:
        argv = ["train_dino.py", *NETWORKS[net], *DINO_FLAGS, "--data_path", self.data,
                "--output_dir", self.checkpoint(net).parent]
        first = python(*argv, "--exit_after_iterations", "1")
        if first.returncode != 0:
            return first, first
        step_one = torch.load(self.checkpoint(net), map_location="cpu", weights_only=True)
        (self.root / net / "step1_iteration.json").write_text(json.dumps(
            {"iteration": step_one["iteration"], "norm": float(sum(v.float().norm() for v in
                                                                    step_one["teacher"].values()))}))
        del step_one
        return first, python(*argv, "--exit_after_iterations", "2")

    def _tool(self, tool: str, name: str) -> Ran:
        out = self.root / name / tool
        if name in NETWORKS:
            first, second = self.result(("train", name))
            if second.returncode != 0:
                raise RuntimeError(f"no checkpoint of {name}: train_dino.py failed (see its test)")
            weights, flags = self.checkpoint(name), []
        else:
            if self.reference_dir is None:
                raise RuntimeError("reference fixtures not found; set SIMPOOL_FIXTURES to their folder")
            file, flags = REFERENCE[name]
            weights = self.reference_dir / file
        if tool == "background_robustness":
            return background_robustness(weights, flags, out, self.data.parent / "layouts" / "in9")
        return python(*tool_argv(tool, weights, flags, out, self.data))


def _reference_dir() -> Path | None:
    return next((folder for folder in FIXTURE_DIRS if (folder / "outputs.pt").is_file()), None)


@pytest.fixture(scope="module")
def tier(request, tmp_path_factory) -> Tier:
    root = tmp_path_factory.mktemp("paper")
    write_image_folder(root / "data", per_class=2, num_classes=2, size=(224, 256))  # 4 train + 4 val images
    write_layouts(root / "layouts")
    run = Tier(root, root / "data", _reference_dir())
    wanted = set()
    for item in request.session.items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        job = JOB_OF_TEST.get(getattr(item, "originalname", ""))
        if item.module is request.module and job and "net" in params:
            wanted.add((job, params["net"]))
        if item.module is request.module and "reference" in params:
            wanted.add((params["tool"], params["reference"]))
    run.start(wanted)
    started = time.monotonic()
    yield run
    run.pool.shutdown(wait=True, cancel_futures=True)
    if os.environ.get("SIMPOOL_PAPER_TIMINGS"):  # a JSON file to write each command's seconds into
        Path(os.environ["SIMPOOL_PAPER_TIMINGS"]).write_text(json.dumps(run.timings(time.monotonic() - started),
                                                                        indent=1))


def assert_same_size_pngs(folder: Path, names: set[str]) -> None:
    assert names <= {p.name for p in folder.iterdir()}, sorted(p.name for p in folder.iterdir())
    sizes = {name: Image.open(folder / name).size for name in names}
    assert len(set(sizes.values())) == 1, sizes


# ------------------------------------------------------------------------------------------------------------
# the trained networks through every tool
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("net", list(NETWORKS))
def test_train_dino_two_steps_stop_and_resume(tier, net):
    first, second = tier.result(("train", net))
    first.ok()
    assert "stopped after iteration 1 (--exit_after_iterations)" in first.stdout
    assert json.loads((tier.root / net / "step1_iteration.json").read_text())["iteration"] == 1
    second.ok()
    assert f"resumed from {tier.checkpoint(net)} at epoch 0, iteration 1 (sample 2 of the epoch's 4)" in second.stdout
    state = torch.load(tier.checkpoint(net), map_location="cpu", weights_only=True)
    assert state["iteration"] == 2 and state["epoch"] == 1  # step 2 ended the epoch (4 images, batch 2)
    norm = float(sum(v.float().norm() for v in state["teacher"].values()))
    assert norm != json.loads((tier.root / net / "step1_iteration.json").read_text())["norm"]  # step 2 moved it
    epoch_log = json.loads((tier.checkpoint(net).parent / "log.txt").read_text().splitlines()[-1])
    assert epoch_log["epoch"] == 0 and math.isfinite(epoch_log["train_loss"])
    assert "knn" in epoch_log  # the online k-NN on val/ ran at 224 px
    args = (tier.checkpoint(net).parent / "args.yaml").read_text()
    assert f"arch: {NETWORKS[net][1]}\n" in args and "global_crops_size: 224\n" in args


@pytest.mark.parametrize("net", list(NETWORKS))
def test_eval_knn(tier, net):
    tier.result(("eval_knn", net)).ok()
    result = json.loads((tier.root / net / "eval_knn" / "knn.json").read_text())
    assert (result["arch"], result["mode"]) == (NETWORKS[net][1], NETWORKS[net][-1])
    assert result["image_size"] == 224 and (result["num_train"], result["num_val"]) == (4, 4)
    assert set(result["results"]) == {"1", "2"}
    assert all(0 <= r["top1"] <= 100 for r in result["results"].values())


@pytest.mark.parametrize("net", list(NETWORKS))
def test_eval_linear(tier, net):
    ran = tier.result(("eval_linear", net)).ok()
    assert "linear probe done: best top-1" in ran.stdout
    epoch_log = [json.loads(line) for line in (tier.root / net / "eval_linear" / "log.txt").read_text().splitlines()]
    assert [line["epoch"] for line in epoch_log] == [0]
    assert 0 <= epoch_log[0]["test_acc1"] <= 100 and all(math.isfinite(v) for v in epoch_log[0]["train_loss"])


@pytest.mark.parametrize("net", list(NETWORKS))
def test_segmentation(tier, net):
    tier.result(("segmentation", net)).ok()
    result = json.loads((tier.root / net / "segmentation" / "segmentation.json").read_text())
    assert result["image_size"] == 224 and result["feature_dim"] == EMBED_DIM[net]
    assert (result["num_train"], result["num_val"]) == (4, 4)
    assert 0 <= result["miou"] <= 1 and 0 <= result["pixel_accuracy"] <= 1


@pytest.mark.parametrize("net", list(NETWORKS))
def test_finetune(tier, net):
    ran = tier.result(("finetune", net)).ok()
    assert "stopped after iteration 1" in ran.stdout
    state = torch.load(tier.root / net / "finetune" / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert state["iteration"] == 1 and state["model"]["head.weight"].shape == (2, EMBED_DIM[net])
    teacher = torch.load(tier.checkpoint(net), map_location="cpu", weights_only=True, mmap=True)["teacher"]
    changed = [k for k, v in state["model"].items() if k.startswith("backbone.") and v.is_floating_point()
               and not torch.equal(v, teacher[k].to(v.dtype))]
    assert changed, "one fine-tuning step left every backbone weight as pretrained"


@pytest.mark.parametrize("net", list(NETWORKS))
def test_export(tier, net):
    from simpool.loading import load_backbone

    ran = tier.result(("export", net)).ok()
    out = tier.root / net / "export"
    assert "onnxruntime matches torch" in ran.stdout
    config = json.loads((out / "config.json").read_text())
    assert (config["arch"], config["mode"], config["embed_dim"]) == (NETWORKS[net][1], NETWORKS[net][-1],
                                                                      EMBED_DIM[net])
    assert onnx_error(load_backbone(out), out / "model.onnx", ONNX_SHAPES) <= 1e-4
    if config["mode"] == "official":  # a plain timm copy, loadable by timm alone
        import timm

        timm_model = timm.create_model(config["timm"]["model_name"], pretrained=True, num_classes=0,
                                       pretrained_cfg_overlay={"file": str(out / config["timm"]["file"])},
                                       **config["timm"]["kwargs"]).eval()
        images = torch.randn(1, 3, 224, 224)
        with torch.no_grad():
            assert torch.allclose(timm_model(images), load_backbone(out)(images), atol=1e-5)


@pytest.mark.parametrize("net", list(NETWORKS))
def test_load_backbone_and_torch_hub(tier, net):
    from simpool.loading import load_backbone, load_model

    tier.result(("export", net)).ok()
    out = tier.root / net / "export"
    exported = load_backbone(out)
    hub = torch.hub.load(str(REPO), "backbone", path=str(out), source="local")
    trained, _ = load_model(tier.checkpoint(net))
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        features = exported(images)
        assert features.shape == (2, EMBED_DIM[net])
        assert torch.equal(hub(images), features) and torch.equal(trained(images), features)
        assert exported(torch.randn(1, 3, 160, 224)).shape == (1, EMBED_DIM[net])


@pytest.mark.parametrize("net", list(NETWORKS))
def test_visualize(tier, net):
    ran = tier.result(("visualize", net)).ok()
    folders = sorted(p for p in (tier.root / net / "visualize").iterdir() if p.is_dir())
    assert len(folders) == 2 and ran.stdout.count("PNGs in") == 2  # the two val images of the class
    maps = {"attention_mean.png", "mask_mean.png", "attention_head5.png"} if net.endswith("official") \
        else {"attention.png", "mask.png"}
    for folder in folders:
        assert_same_size_pngs(folder, {"image.png", "pca.png", *maps})


@pytest.mark.parametrize("net", list(NETWORKS))
def test_attention(tier, net):
    tier.result(("attention", net)).ok()
    result = json.loads((tier.root / net / "attention" / "attention.json").read_text())
    assert result["num_images"] == 4 and result["image_size"] == 224
    official = net.endswith("official")
    assert result["map"] == ("[CLS] self-attention" if official else "simpool attention a")
    assert result["num_heads"] == (6 if official else 1)
    for row in result["rows"].values():
        assert 0 <= row["jaccard_mass"] <= row["jaccard_best_threshold"] <= 1 and 0 <= row["corloc"] <= 1


# ------------------------------------------------------------------------------------------------------------
# weights written by the reference code through the tools
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("reference", "tool"), [(ref, tool) for ref, tools in REFERENCE_TOOLS.items()
                                                 for tool in tools])
def test_reference_weights(tier, reference, tool):
    from simpool.loading import load_backbone

    if tier.reference_dir is None:
        if os.environ.get("CI"):
            pytest.fail("reference fixtures not found")
        pytest.skip("reference fixtures not found; set SIMPOOL_FIXTURES to their folder")
    ran = tier.result((tool, reference)).ok()
    out = tier.root / reference / tool
    if tool == "eval_knn":
        assert json.loads((out / "knn.json").read_text())["num_val"] == 4
    elif tool == "export":
        model = load_backbone(out)
        # ViTs of the reference resample their position embeddings by a scale computed from the input size
        assert getattr(model, "pos_embed_resampling", "reference") == "reference"
        assert onnx_error(model, out / "model.onnx", [*ONNX_SHAPES, (1, 3, 96, 96)]) <= 1e-4
    elif tool == "visualize":
        assert ran.stdout.count("PNGs in") == 2
        for folder in (p for p in out.iterdir() if p.is_dir()):
            assert_same_size_pngs(folder, {"image.png", "pca.png", "attention.png", "mask.png"})
    elif tool == "attention":
        assert json.loads((out / "attention.json").read_text())["num_images"] == 4


# ------------------------------------------------------------------------------------------------------------
# SimPool's tables and DINO's other evaluators on the trained networks
# ------------------------------------------------------------------------------------------------------------
def read_result(tier: Tier, net: str, tool: str, name: str) -> dict:
    tier.result((tool, net)).ok()
    return json.loads((tier.root / net / tool / name).read_text())


@pytest.mark.parametrize("net", list(NETWORKS))
def test_localization(tier, net):
    result = read_result(tier, net, "localization", "localization.json")
    assert result["num_images"] == 4 and result["rows"]
    assert all(0 <= value <= 100 for value in result["rows"].values())
    assert len(list((tier.root / net / "localization" / "figures").glob("*.png"))) == 1


@pytest.mark.parametrize("net", list(NETWORKS))
def test_object_discovery(tier, net):
    result = read_result(tier, net, "object_discovery", "object_discovery.json")
    assert result["num_images"] == 4
    convnet = not net.startswith("vit")
    assert any(name.startswith("LOST") for name in result["rows"]) != convnet  # LOST needs a ViT's keys
    assert all(0 <= value <= 100 for value in result["rows"].values())


@pytest.mark.parametrize("net", list(NETWORKS))
def test_background_robustness(tier, net):
    result = read_result(tier, net, "background_robustness", "background_robustness.json")
    assert set(result["accuracy"]) >= {"original", "mixed_rand", "mixed_next", "only_fg", "no_fg"}
    assert all(0 <= value <= 100 for value in result["accuracy"].values())
    assert set(result["num_images"].values()) == {9}


@pytest.mark.parametrize("net", list(NETWORKS))
def test_retrieval(tier, net):
    result = read_result(tier, net, "retrieval", "retrieval_roxford5k.json")
    assert result["num_queries"] == 2
    for setup in ("medium", "hard"):
        assert 0 <= result[setup]["map"] <= 100


@pytest.mark.parametrize("net", list(NETWORKS))
def test_copy_detection(tier, net):
    result = read_result(tier, net, "copy_detection", "copy_detection.json")
    assert "strong" in result["map"] and all(0 <= v <= 1 for v in result["map"].values())


@pytest.mark.parametrize("net", list(NETWORKS))
def test_video_segmentation(tier, net):
    result = read_result(tier, net, "video_segmentation", "video_segmentation.json")
    assert 0 <= result["J&F-Mean"] <= 1
    video = next(p for p in (tier.root / net / "video_segmentation").iterdir() if p.is_dir() and p.name != "features")
    with Image.open(sorted(video.glob("*.png"))[-1]) as png:
        assert png.mode == "P" and png.size == (256, 224)  # indexed, at the frames' own size


@pytest.mark.parametrize("net", list(NETWORKS))
def test_plot_log(tier, net):
    tier.result(("plot_log", net)).ok()
    with Image.open(tier.root / net / "plot_log" / "curves.png") as png:
        assert png.size[0] > 400
