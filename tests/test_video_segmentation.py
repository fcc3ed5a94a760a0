"""Video segmentation: frame sizes, the neighbourhood, label propagation against a port of DINO's loop, the DAVIS
palette, the reader's checks, and the driver end to end on generated DAVIS videos (resume, 2 gloo ranks)."""

from __future__ import annotations

import copy
import json
import queue
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from simpool.data.davis import read_annotation, read_davis
from simpool.data.generated.davis import write_davis_style
from simpool.data.paths import DataError
from simpool.evaluation import run_video_segmentation as cli
from simpool.evaluation.video_segmentation import (
    davis_palette,
    frame_size,
    label_propagation,
    load_frame,
    neighborhood_mask,
    segment_video,
)
from simpool.loading import load_model
from tests.helpers import run_module, torchrun

FASHION = Path("/usr/share/datasets/fashion-mnist")
TINY = ["--arch", "vit_tiny", "--mode", "simpool", "--patch_size", "8", "--model_overrides", "depth=1",
        "embed_dim=32", "num_heads=2"]


def tiny_model(mode="simpool"):
    model, _ = load_model(None, random_init=True, arch="vit_tiny", mode=mode, patch_size=8, depth=1, embed_dim=32,
                          num_heads=2)
    return model


# ---------------------------------------------------------------- DINO's loop, ported as it is
def dino_restrict_neighborhood(h, w, size):
    mask = torch.zeros(h, w, h, w)
    for i in range(h):
        for j in range(w):
            for p in range(2 * size + 1):
                for q in range(2 * size + 1):
                    if i - size + p < 0 or i - size + p >= h or j - size + q < 0 or j - size + q >= w:
                        continue
                    mask[i, j, i - size + p, j - size + q] = 1
    return mask.reshape(h * w, h * w)


def dino_label_propagation(feat_tar, list_frame_feats, list_segs, h, w, size, topk):
    ncontext = len(list_frame_feats)
    feat_sources = torch.stack(list_frame_feats)  # n x dim x hw
    feat_tar = F.normalize(feat_tar, dim=1, p=2)
    feat_sources = F.normalize(feat_sources, dim=1, p=2)
    feat_tar = feat_tar.unsqueeze(0).repeat(ncontext, 1, 1)
    aff = torch.exp(torch.bmm(feat_tar, feat_sources) / 0.1)
    if size > 0:
        aff *= dino_restrict_neighborhood(h, w, size).unsqueeze(0).repeat(ncontext, 1, 1)
    aff = aff.transpose(2, 1).reshape(-1, h * w)
    tk_val, _ = torch.topk(aff, dim=0, k=topk)
    tk_val_min, _ = torch.min(tk_val, dim=0)
    aff[aff < tk_val_min] = 0
    aff = aff / torch.sum(aff, keepdim=True, axis=0)
    segs = torch.cat(list_segs)
    nmb_context, channels, h, w = segs.shape
    segs = segs.reshape(nmb_context, channels, -1).transpose(2, 1).reshape(-1, channels).T
    return torch.mm(segs, aff).reshape(1, channels, h, w)


def dino_segment(model, frames, first_annotation, short_side, n_last_frames=7, size=12, topk=5, patch=8):
    def feature(path):
        frame, _ = load_frame(path, short_side)
        with torch.no_grad():
            out = model.patch_features(frame[None])[0]  # d x h x w
        return out.flatten(1).T, out.shape[1], out.shape[2]  # hw x d

    first_feat, h, w = feature(frames[0])
    small = np.array(Image.fromarray(first_annotation).resize((w, h), 0))
    first_seg = F.one_hot(torch.from_numpy(small).long(), int(first_annotation.max()) + 1).permute(2, 0, 1)[None]
    first_seg = first_seg.float()
    que = queue.Queue(n_last_frames)
    outputs = []
    for path in frames[1:]:
        feat_tar, _, _ = feature(path)
        used_feats = [first_feat.T] + [pair[0] for pair in list(que.queue)]
        used_segs = [first_seg] + [pair[1] for pair in list(que.queue)]
        avg = dino_label_propagation(feat_tar, used_feats, used_segs, h, w, size, topk)
        if que.qsize() == n_last_frames:
            que.get()
        que.put([feat_tar.T, copy.deepcopy(avg)])
        avg = F.interpolate(avg, scale_factor=patch, mode="bilinear", align_corners=False,
                            recompute_scale_factor=False)[0]
        for c in range(avg.shape[0]):  # norm_mask
            if avg[c].max() > 0:
                avg[c] = (avg[c] - avg[c].min()) / (avg[c] - avg[c].min()).max()
        seg = avg.argmax(0).to(torch.uint8).numpy()
        with Image.open(path) as image:
            outputs.append(np.array(Image.fromarray(seg).resize(image.size, 0)))
    return outputs


# ---------------------------------------------------------------- pieces
def test_frame_size_is_dinos():
    assert frame_size(480, 854) == (480, 832)  # DAVIS 480p
    assert frame_size(854, 480) == (832, 480)
    assert frame_size(96, 160, short_side=64) == (64, 64)  # 106.7 rounds down to 64
    assert frame_size(100, 100, short_side=96) == (96, 64)
    assert frame_size(100, 100, short_side=32) == (32, 64)  # never below one multiple of 64


def test_neighborhood_mask_equals_dinos_loops():
    for h, w, size in ((3, 4, 1), (5, 6, 2), (4, 4, 12)):
        assert torch.equal(neighborhood_mask(h, w, size).float(), dino_restrict_neighborhood(h, w, size))


def test_label_propagation_by_hand_and_chunked_equals_whole():
    # one source frame of 3 patches; the target patch is closest to source 1, then 0, then 2
    sources = F.normalize(torch.tensor([[[1.0, 0.2], [1.0, 0.0], [0.0, 1.0]]]), dim=2)
    labels = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]])  # (1 frame, C=2, 3 patches)
    target = torch.tensor([[1.0, 0.0]])
    top1 = label_propagation(target, sources, labels, topk=1)
    torch.testing.assert_close(top1, torch.tensor([[0.0], [1.0]]))  # all weight on source 1 (label 1)
    top2 = label_propagation(target, sources, labels, topk=2)
    w0, w1 = np.exp(float(sources[0, 0] @ target[0]) / 0.1), np.exp(1.0 / 0.1)
    torch.testing.assert_close(top2, torch.tensor([[w0 / (w0 + w1)], [w1 / (w0 + w1)]], dtype=torch.float32))
    torch.manual_seed(0)
    src = F.normalize(torch.randn(3, 20, 8), dim=2)
    lab = torch.rand(3, 4, 20)
    tgt = F.normalize(torch.randn(20, 8), dim=1)
    mask = neighborhood_mask(4, 5, 1)
    whole = label_propagation(tgt, src, lab, mask, chunk=1000)
    torch.testing.assert_close(label_propagation(tgt, src, lab, mask, chunk=3), whole)


def test_palette_is_the_pascal_colour_map():
    palette = np.array(davis_palette()).reshape(256, 3)
    assert palette[:4].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]]
    assert palette[255].tolist() == [224, 224, 192]


@pytest.fixture(scope="module")
def davis(tmp_path_factory):
    if not (FASHION / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    root = tmp_path_factory.mktemp("davis")
    write_davis_style(root, num_videos=2, num_frames=6, size=(72, 120))
    return root


def test_generated_videos_read_like_davis(davis):
    videos = read_davis(davis)
    assert [v.name for v in videos] == ["fashion-0-00", "fashion-0-01"]
    assert all(v.fully_annotated and len(v.frames) == 6 for v in videos)
    first = read_annotation(videos[0].annotations[0])
    assert set(np.unique(first)) == {0, 1, 2}
    with Image.open(videos[0].annotations[0]) as image:
        assert image.mode == "P" and image.getpalette()[:6] == [0, 0, 0, 128, 0, 0]


def test_segment_video_equals_dinos_loop(davis):
    model = tiny_model()
    video = read_davis(davis)[0]
    first = read_annotation(video.annotations[0])
    ours = [labels for _, labels in segment_video(model, video.frames, first, short_side=64, n_last_frames=2,
                                                  size_mask_neighborhood=2, topk=3, batch_size=4, chunk=5)]
    dino = dino_segment(model, video.frames, first, 64, n_last_frames=2, size=2, topk=3)
    assert len(ours) == len(dino) == 5
    for a, b in zip(ours, dino, strict=True):
        assert a.shape == (72, 120) and (a == b).mean() > 0.999


# ---------------------------------------------------------------- the driver
def run(argv):
    assert cli.main(argv) == 0
    return json.loads((Path(argv[argv.index("--output_dir") + 1]) / "video_segmentation.json").read_text())


def test_driver_writes_davis_pngs_scores_them_and_resumes(davis, tmp_path):
    out = tmp_path / "seg"
    flags = ["--random_init", *TINY, "--data_path", str(davis), "--short_side", "64", "--output_dir", str(out)]
    result = run(flags)
    assert result["format"] == "simpool-video-segmentation-1" and result["num_videos"] == 2
    assert 0 <= result["J&F-Mean"] <= 1 and set(result["per_object"]) == {
        "fashion-0-00_1", "fashion-0-00_2", "fashion-0-01_1", "fashion-0-01_2"}
    pngs = sorted((out / "fashion-0-00").glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:05d}.png" for i in range(6)]
    with Image.open(pngs[3]) as image:
        assert image.mode == "P" and image.size == (120, 72) and image.getpalette()[:6] == [0, 0, 0, 128, 0, 0]
    assert (read_annotation(pngs[0]) == read_annotation(davis / "Annotations/480p/fashion-0-00/00000.png")).all()

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    lines = (out / "davis.rank0.jsonl").read_text().splitlines()
    (out / "davis.rank0.jsonl").write_text(lines[0] + "\n")  # as if killed during the second video
    again = run(flags)
    assert again["J&F-Mean"] == pytest.approx(result["J&F-Mean"])
    redone = {p for p in out.rglob("*.png") if p.stat().st_mtime_ns != stamps[p]}
    assert redone and all(p.parent.name == json.loads(lines[1])["id"] for p in redone)


def test_bad_input_is_one_error_line(davis, tmp_path, capsys):
    broken = tmp_path / "davis"
    write_davis_style(broken, num_videos=1, num_frames=3, size=(48, 64))
    (broken / "Annotations/480p/fashion-0-00/00000.png").unlink()
    assert cli.main(["--random_init", *TINY, "--data_path", str(broken)]) == 2
    assert "first frame's annotation" in capsys.readouterr().err
    assert cli.main(["--random_init", *TINY, "--data_path", str(tmp_path / "nowhere")]) == 2
    assert "has no JPEGImages/480p/" in capsys.readouterr().err
    with pytest.raises(DataError, match="missing"):
        read_davis(broken, split="train")
    result = run_module("simpool.evaluation.run_video_segmentation", "--random_init", *TINY, "--data_path", str(davis),
                        "--videos", "no-such-video")
    assert result.returncode == 2 and result.stderr.startswith("error: ")
    assert len(result.stderr.strip().splitlines()) == 1 and "no-such-video" in result.stderr


@pytest.mark.slow
def test_two_gloo_processes_give_the_single_process_result(davis, tmp_path):
    flags = ["--random_init", *TINY, "--data_path", str(davis), "--short_side", "64"]
    single = run([*flags, "--output_dir", str(tmp_path / "one")])
    result = run_module("simpool.evaluation.run_video_segmentation", *flags,
                        "--output_dir", str(tmp_path / "two"), launcher=torchrun())
    assert result.returncode == 0, result.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "video_segmentation.json").read_text())
    assert two["J&F-Mean"] == pytest.approx(single["J&F-Mean"]) and two["per_object"] == single["per_object"]
    assert (tmp_path / "two" / "davis.rank1.jsonl").is_file()  # the second rank segmented a video
