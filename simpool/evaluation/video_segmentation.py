"""Semi-supervised video object segmentation by label propagation on frozen patch features (DINO's
``eval_video_segmentation.py``, after Jabri et al.'s space-time correspondence protocol), for any backbone.

Per video: every frame is resized so its short side is ``short_side`` (480) and its long side the largest multiple
of 64 below the proportional size (cv2-style bilinear), normalised, and embedded into its L2-normalised
last-block patch tokens (a convnet: its last feature map), ``f_t`` (hw, D). The first frame's annotation, resized to
the patch grid by nearest neighbour, gives one-hot labels ``y_0`` (C, hw). Frame t takes its labels from the first
frame and the ``n_last_frames`` (7) previous ones (their soft labels, not their argmax):

    A[s, j] = exp(<f_src[s], f_t[j]> / 0.1)   for sources s within ``size_mask_neighborhood`` (12) patches of j
                                               (Chebyshev distance on the grid), else 0
    keep per target j the ``topk`` (5) largest A[s, j] over all sources of all context frames (ties kept), zero
    the rest, normalise each column to sum 1;   y_t = y_src A   (C, hw)

``y_t`` is upsampled bilinearly by the stride (x patch), each channel min-max normalised (when its max > 0),
argmax'ed, resized to the frame's original size by nearest neighbour and written as an indexed PNG in the DAVIS
palette (the PASCAL colour map, built in code: DINO downloads it at run time).

Memory per video is bounded: features are extracted ``batch_size`` frames at a time and only the context's are
kept; the affinity is computed for ``chunk`` target patches at a time.

Example:
    >>> for name, labels in segment_video(model, video.frames, read_annotation(video.annotations[0])):
    ...     write_indexed_png(out / f"{name}.png", labels)
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from simpool.data.davis import Video, read_annotation
from simpool.data.every_item import open_rgb
from simpool.data.fashion_on_photos import voc_palette
from simpool.distributed import is_main_process
from simpool.evaluation.backbone_view import global_and_patches, model_stride
from simpool.evaluation.davis_metrics import evaluate_video, summarize
from simpool.run import ItemResults, shard
from simpool.run.process import data_errors_agreed

__all__ = ["DAVIS_MEAN", "DAVIS_STD", "FORMAT", "davis_palette", "frame_size", "label_propagation", "load_frame",
           "neighborhood_mask", "run_video_segmentation", "segment_video", "upsample_labels", "write_indexed_png"]

FORMAT = "simpool-video-segmentation-1"

# DINO's colour normalisation for this task (its std 0.228 differs from ImageNet's 0.229: kept, it is the protocol)
DAVIS_MEAN, DAVIS_STD = (0.485, 0.456, 0.406), (0.228, 0.224, 0.225)


def davis_palette() -> list[int]:
    """The DAVIS / PASCAL VOC colour map as a flat PIL palette (0 black, 1 (128, 0, 0), 2 (0, 128, 0), ...)."""
    return voc_palette()


def frame_size(height: int, width: int, short_side: int = 480) -> tuple[int, int]:
    """(h, w) a frame is resized to: the short side to ``short_side``, the long side proportional, rounded down to
    a multiple of 64 (DINO's ``read_frame``; for a square frame the width is the long side, and the annotation uses
    the same size -- DINO's ``read_seg`` swaps the two for square frames; never below 64)."""
    if height > width:
        return max(64, int(short_side * height / width // 64 * 64)), short_side
    return short_side, max(64, int(short_side * width / height // 64 * 64))


def load_frame(path: str | os.PathLike, short_side: int = 480) -> tuple[torch.Tensor, tuple[int, int]]:
    """(3, h, w) normalised frame (bilinear, half-pixel centres, no antialias: cv2's INTER_LINEAR) and its
    original (H, W)."""
    pixels = torch.from_numpy(np.asarray(open_rgb(path), dtype=np.float32).copy())
    original = tuple(pixels.shape[:2])
    size = frame_size(*original, short_side)
    frame = F.interpolate(pixels.permute(2, 0, 1)[None] / 255.0, size=size, mode="bilinear", align_corners=False)[0]
    mean, std = torch.tensor(DAVIS_MEAN)[:, None, None], torch.tensor(DAVIS_STD)[:, None, None]
    return (frame - mean) / std, original


def neighborhood_mask(height: int, width: int, radius: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(hw, hw) bool: patches (i, j) and (i', j') within ``radius`` rows and columns of each other."""
    rows = torch.arange(height, device=device).repeat_interleave(width)
    cols = torch.arange(width, device=device).repeat(height)
    return ((rows[:, None] - rows[None, :]).abs() <= radius) & ((cols[:, None] - cols[None, :]).abs() <= radius)


def label_propagation(target: torch.Tensor, sources: torch.Tensor, source_labels: torch.Tensor,
                      mask: torch.Tensor | None = None, topk: int = 5, temperature: float = 0.1,
                      chunk: int = 1024) -> torch.Tensor:
    """Labels (C, hw) of ``target`` (hw, D) from ``sources`` (n, hw, D) with labels (n, C, hw), both L2-normalised;
    ``mask`` (hw_source, hw_target) bool or None. ``chunk`` target patches at a time: n * hw * chunk floats.

    Each target's affinities lie along one row here (DINO lays them in a column): the top-k and the normalisation
    then run over contiguous memory, several times faster on a CPU; the values are the same.
    """
    num_sources, source_hw, _ = sources.shape
    flat_sources = sources.reshape(num_sources * source_hw, -1)
    flat_labels = source_labels.permute(0, 2, 1).reshape(num_sources * source_hw, -1)  # (n * hw, C)
    out = []
    for start in range(0, target.shape[0], chunk):
        aff = torch.exp(target[start:start + chunk] @ flat_sources.T / temperature)  # (chunk, n * hw)
        if mask is not None:
            rows = aff.shape[0]
            aff = (aff.view(rows, num_sources, source_hw) * mask[:, start:start + chunk].T[:, None, :]).view(rows, -1)
        kth = torch.topk(aff, k=min(topk, aff.shape[1]), dim=1).values[:, -1:]
        aff = torch.where(aff < kth, torch.zeros_like(aff), aff)
        aff = aff / aff.sum(dim=1, keepdim=True)
        out.append(aff @ flat_labels)  # (chunk, C)
    return torch.cat(out).T


def upsample_labels(probabilities: torch.Tensor, stride: int, original: tuple[int, int]) -> np.ndarray:
    """(C, h, w) soft labels -> (H, W) uint8 ids: bilinear x stride, per-channel min-max, argmax, nearest resize."""
    up = F.interpolate(probabilities[None], scale_factor=stride, mode="bilinear", align_corners=False,
                       recompute_scale_factor=False)[0]
    low = up.amin(dim=(1, 2), keepdim=True)
    high = (up - low).amax(dim=(1, 2), keepdim=True)
    normalised = torch.where(up.amax(dim=(1, 2), keepdim=True) > 0, (up - low) / high.clamp(min=1e-30), up)
    labels = normalised.argmax(dim=0).to(torch.uint8).cpu().numpy()
    return np.array(Image.fromarray(labels).resize((original[1], original[0]), Image.NEAREST))


def write_indexed_png(path: str | os.PathLike, labels: np.ndarray) -> None:
    """Object ids (H, W) as an indexed PNG in the DAVIS palette, written to a temporary name first."""
    path = Path(path)
    image = Image.fromarray(labels.astype(np.uint8), mode="P")
    image.putpalette(davis_palette())
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def _patch_features(model: torch.nn.Module, frames: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    patches = global_and_patches(model, frames).patches.float()  # (B, D, h, w)
    return F.normalize(patches.flatten(2).transpose(1, 2), dim=2), tuple(patches.shape[-2:])  # (B, hw, D)


@torch.no_grad()
def segment_video(
    model: torch.nn.Module,
    frames: Sequence[str | os.PathLike],
    first_annotation: np.ndarray,
    short_side: int = 480,
    n_last_frames: int = 7,
    size_mask_neighborhood: int = 12,
    topk: int = 5,
    temperature: float = 0.1,
    batch_size: int = 8,
    chunk: int = 1024,
    device: torch.device | str = "cpu",
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (frame name, (H, W) uint8 object ids) for frames 1, 2, ... (frame 0 is the given annotation)."""
    device = torch.device(device)
    stride = model_stride(model)
    # void (255) is no object to follow: background, as davis2017-evaluation counts it (DINO would make 256 channels)
    first_annotation = np.where(first_annotation == 255, 0, first_annotation).astype(np.uint8)
    num_objects = int(first_annotation.max()) + 1
    context: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=n_last_frames)
    first = mask = None
    for start in range(0, len(frames), batch_size):
        loaded = [load_frame(path, short_side) for path in frames[start:start + batch_size]]
        features, grid = _patch_features(model, torch.stack([f for f, _ in loaded]).to(device))
        if first is None:
            labels = Image.fromarray(first_annotation).resize((grid[1], grid[0]), Image.NEAREST)
            labels = torch.from_numpy(np.array(labels)).long().to(device)
            one_hot = F.one_hot(labels.view(-1), num_objects).T.float()  # (C, hw)
            first = (features[0], one_hot)
            if size_mask_neighborhood > 0:
                mask = neighborhood_mask(*grid, size_mask_neighborhood, device)
        for offset, (feature, (_, original)) in enumerate(zip(features, loaded, strict=True)):
            if start + offset == 0:
                continue
            used = [first, *context]
            probabilities = label_propagation(feature, torch.stack([f for f, _ in used]),
                                              torch.stack([y for _, y in used]), mask, topk, temperature, chunk)
            context.append((feature, probabilities))
            labels = upsample_labels(probabilities.view(num_objects, *grid), stride, original)
            yield Path(frames[start + offset]).stem, labels


def segment_and_score(model: torch.nn.Module, video: Video, output_dir: Path, device: torch.device,
                      batch_size: int = 6, chunk: int = 1024, **protocol) -> dict:
    """Write one video's PNGs in ``output_dir/<video>/``; return its record: the frame count, and per object its J
    and F per frame when every frame is annotated."""
    folder = output_dir / video.name
    folder.mkdir(parents=True, exist_ok=True)
    first = read_annotation(video.annotations[0])
    write_indexed_png(folder / f"{video.frames[0].stem}.png", first)
    predictions = [first]
    for name, labels in segment_video(model, video.frames, first, batch_size=batch_size, chunk=chunk, device=device,
                                      **protocol):
        write_indexed_png(folder / f"{name}.png", labels)
        predictions.append(labels)
    record: dict = {"frames": len(video.frames)}
    if video.fully_annotated:
        truth = np.stack([read_annotation(path) for path in video.annotations])
        record.update(evaluate_video(truth, np.stack(predictions)))
    return record


def run_video_segmentation(model: torch.nn.Module, videos: Sequence[Video], output_dir: str | os.PathLike,
                           identity: dict, batch_size: int = 6, chunk: int = 1024, device: torch.device | str = "cpu",
                           **protocol) -> dict:
    """Segment the videos no rank has done yet (this rank's share; a rerun skips finished ones), then gather every
    video's record and summarise: ``{"format", "num_videos", "num_frames", "J&F-Mean", "J-Mean", ...}`` (the
    scores only when some video is fully annotated). ``identity``: what the results depend on (weights, data,
    ``protocol``); ``protocol``: the keywords of :func:`segment_video`. Collective under torchrun."""
    output_dir, device = Path(output_dir), torch.device(device)
    model.eval()
    items = ItemResults(output_dir, "davis", identity).open()
    by_name = {video.name: video for video in videos}
    with data_errors_agreed():  # an unreadable frame on one rank stops every rank before the gather
        for name in tqdm(shard(items.todo(list(by_name))), desc="videos", disable=not is_main_process()):
            items.add(name, segment_and_score(model, by_name[name], output_dir, device, batch_size, chunk, **protocol))
    records = items.gather()
    scored = {name: records[name] for name in by_name if "J" in records.get(name, {})}
    result = {"format": FORMAT, "num_videos": len(videos), "num_frames": sum(records[n]["frames"] for n in by_name)}
    if scored:
        result.update(summarize(scored))
    return result
