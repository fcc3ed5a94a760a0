"""The attention-quality CLI (simpool.evaluation.run_attention): weights in, Jaccard/CorLoc table and JSON out.

The metrics themselves are tested in test_attention_metrics.py; here: loading checkpoints and export folders,
both data sources (generated fashion-on-photos, a VOC-style folder), the per-head report of official ViTs, and
that the glue (image preparation -> map -> upsampling -> scores) loses nothing: a map equal to the mask scores 1.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from simpool.data.generated.voc import write_voc_style
from simpool.data.masks import MaskSample, mask_to_box
from simpool.evaluation.attention_scores import evaluate_attention, load_mask_samples, parse_fashion_spec
from simpool.evaluation.run_attention import main
from simpool.export import export_backbone
from tests.helpers import TINY_ATTENTION_VIT as TINY
from tests.helpers import needs_fashion, read_scores, tiny_checkpoint


def tiny_export(folder: Path, mode: str) -> Path:
    return export_backbone(tiny_checkpoint(folder, mode), folder / f"export_{mode}", arch="vit_tiny", mode=mode,
                           patch_size=8, **TINY)


@needs_fashion
def test_official_export_on_generated_images_reports_mean_and_best_head(tmp_path, capsys):
    out = tmp_path / "official.json"
    code = main(["--pretrained_weights", str(tiny_export(tmp_path, "official")),
                 "--data_path", "fashion-on-photos:4", "--image_size", "32", "--output", str(out)])
    assert code == 0
    result = read_scores(out)
    assert result["num_images"] == 4 and result["num_heads"] == 2 and result["mode"] == "official"
    names = list(result["rows"])
    assert names[:2] == ["mean over heads", "head-average map"] and names[2].startswith("best head (")
    per_head = result["report"]["per_head"]["jaccard_mass"]
    best = result["report"]["best_head"]
    assert len(per_head) == 2 and best["jaccard_mass"] == max(per_head)
    assert result["rows"]["mean over heads"]["jaccard_mass"] == pytest.approx(sum(per_head) / 2)
    assert "best head" in capsys.readouterr().out  # the table is printed too


@needs_fashion
def test_simpool_checkpoint_on_voc_folder(tmp_path):
    folder = tmp_path / "voc"
    write_voc_style(folder, 3, image_size=32)
    out = tmp_path / "simpool.json"
    code = main(["--pretrained_weights", str(tiny_checkpoint(tmp_path, "simpool")), "--arch", "vit_tiny",
                 "--mode", "simpool", "--patch_size", "8", "--model_overrides", "depth=1", "embed_dim=32",
                 "num_heads=2", "img_size=32", "--data_path", str(folder), "--image_size", "32",
                 "--output", str(out)])
    assert code == 0
    result = read_scores(out)
    assert result["num_images"] == 3 and result["mode"] == "simpool"
    assert list(result["rows"]) == ["map"]  # SimPool has one pooling head: a single map


@needs_fashion
def test_default_output_goes_beside_the_export(tmp_path):
    export = tiny_export(tmp_path, "simpool")
    assert main(["--pretrained_weights", str(export), "--data_path", "fashion-on-photos:2",
                 "--image_size", "32"]) == 0
    assert read_scores(export / "attention.json")["num_images"] == 2


@pytest.mark.parametrize("data_path, message", [("/nonexistent/voc", "VOC-style"),
                                                ("fashion-on-photos:0", "positive integer")])
def test_bad_data_path_exits_2_with_a_message(tmp_path, capsys, data_path, message):
    export = tiny_export(tmp_path, "official")
    assert main(["--pretrained_weights", str(export), "--data_path", data_path]) == 2
    assert message in capsys.readouterr().err


def test_missing_weights_is_an_error_not_a_random_model(capsys):
    assert main(["--data_path", "fashion-on-photos:2"]) == 2
    assert "--pretrained_weights" in capsys.readouterr().err


def test_parse_fashion_spec():
    assert parse_fashion_spec("fashion-on-photos") == 200
    assert parse_fashion_spec("fashion-on-photos:7") == 7
    assert parse_fashion_spec("/data/VOC2012") is None


# ------------------------------------------------------------------------------------------ glue, exactly
class MaskReader(nn.Module):
    """A real module whose attention map is read off its input: head 0 = the mean of the first channel per
    patch (the object, painted white on black), head 1 = its complement (attends to the background)."""

    patch_size = 8

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))  # so next(model.parameters()) finds the device

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        on_object = F.avg_pool2d(x[:, :1], self.patch_size)
        on_object = on_object - on_object.amin(dim=(-2, -1), keepdim=True)
        on_object = on_object / on_object.amax(dim=(-2, -1), keepdim=True)
        return torch.cat([on_object, 1.0 - on_object], dim=1)  # (B, 2, h, w)


def painted_sample(name: str, rows: slice, cols: slice, size: int = 32) -> MaskSample:
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[rows, cols] = True
    image = Image.fromarray((mask.numpy() * 255).astype("uint8")).convert("RGB")
    return MaskSample(name=name, image=image, mask=mask, void=torch.zeros_like(mask),
                      boxes=mask_to_box(mask).view(1, 4))


def test_map_equal_to_the_mask_scores_one_and_best_head_finds_it():
    samples = [painted_sample("a", slice(8, 24), slice(0, 16)), painted_sample("b", slice(0, 8), slice(8, 32))]
    result = evaluate_attention(MaskReader(), samples, image_size=32)
    best = result["rows"]["best head (0)"]  # head 0 is the object, head 1 the background
    assert best["jaccard_best_threshold"] == pytest.approx(1.0)
    assert best["corloc"] == 1.0
    # A flat map on n object patches: the 60%-mass mask keeps ceil(0.6 n) of them, J = 3/4 (a) and 2/3 (b).
    assert best["jaccard_mass"] == pytest.approx((3 / 4 + 2 / 3) / 2)
    per_head = result["report"]["per_head"]["jaccard_best_threshold"]
    assert per_head[1] < 0.5 and result["rows"]["mean over heads"]["jaccard_best_threshold"] < 1.0


def test_masks_keep_their_resolution_when_the_image_is_resized():
    """Image fed at 64 px (maps 8 x 8), mask scored at its own 32 px: nearest upsampling lines them up."""
    samples = [painted_sample("a", slice(8, 24), slice(8, 16))]
    result = evaluate_attention(MaskReader(), samples, image_size=64)
    assert result["rows"]["best head (0)"]["jaccard_best_threshold"] == pytest.approx(1.0)


@needs_fashion
def test_generated_samples_match_their_masks():
    samples = load_mask_samples("fashion-on-photos:3", image_size=48)
    assert len(samples) == 3
    for sample in samples:
        assert sample.image.size == (48, 48) and sample.mask.shape == (48, 48) and sample.mask.any()
        assert torch.equal(sample.boxes[0], mask_to_box(sample.mask))
