"""Fashion-on-photos videos written in DAVIS 2017's layout, for the video-segmentation evaluator: two items moving
over a photo, with exact masks.

Each video: a photo crop as the static background; two Fashion-MNIST items (30-45% of the frame's height, their
own colours) start at random places and move at a constant velocity (2-5 px per frame at the default size),
bouncing off the borders; object 2 is drawn over object 1, so it occludes it when they cross. Frames are JPEGs,
annotations indexed PNGs in the DAVIS palette (0 background, 1 and 2 the items) for every frame, as DAVIS ships
train/val. ``ImageSets/2017/<split>.txt`` lists the videos.

Example::

    >>> write_davis_style("/tmp/davis", num_videos=2, num_frames=8)
    >>> simpool.data.davis.read_davis("/tmp/davis")
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from simpool.data.fashion_on_photos import voc_palette
from simpool.data.generated.compose import fashion_item, paste_item, photo_crop, random_colour

__all__ = ["write_davis_style"]


def write_davis_style(folder: str | Path, num_videos: int = 2, num_frames: int = 10, size: tuple[int, int] = (96, 160),
                      split: str = "val", resolution: str = "480p", seed: int = 0) -> list[str]:
    """Write the videos under ``folder`` (``size`` = (height, width) of the frames); return their names."""
    rng = np.random.default_rng([seed, 2017])
    root = Path(folder)
    height, width = size
    names = []
    for v in range(num_videos):
        name = f"fashion-{seed}-{v:02d}"
        frames_dir, masks_dir = root / "JPEGImages" / resolution / name, root / "Annotations" / resolution / name
        frames_dir.mkdir(parents=True, exist_ok=True)
        masks_dir.mkdir(parents=True, exist_ok=True)
        background = photo_crop(rng, height, width)
        objects = []
        for _ in range(2):
            side = int(rng.uniform(0.3, 0.45) * height)
            position = np.array([rng.uniform(0, height - side), rng.uniform(0, width - side)])
            velocity = rng.uniform(2, 5, size=2) * rng.choice([-1, 1], size=2) * height / 96
            objects.append({"item": fashion_item(int(rng.integers(10_000))), "colour": random_colour(rng),
                            "side": side, "position": position, "velocity": velocity})
        for t in range(num_frames):
            image, labels = background, np.zeros((height, width), np.uint8)
            for obj_id, obj in enumerate(objects, start=1):
                top, left = (int(round(c)) for c in obj["position"])
                image, mask = paste_item(image, obj["item"], obj["colour"], obj["side"], top, left)
                labels[mask] = obj_id
                limits = np.array([height - obj["side"], width - obj["side"]])
                nxt = obj["position"] + obj["velocity"]
                bounce = (nxt < 0) | (nxt > limits)
                obj["velocity"] = np.where(bounce, -obj["velocity"], obj["velocity"])
                obj["position"] = np.clip(obj["position"] + obj["velocity"], 0, limits)
            Image.fromarray(image).save(frames_dir / f"{t:05d}.jpg", quality=92)
            annotation = Image.fromarray(labels, mode="P")
            annotation.putpalette(voc_palette())
            annotation.save(masks_dir / f"{t:05d}.png")
        names.append(name)
    sets = root / "ImageSets" / "2017"
    sets.mkdir(parents=True, exist_ok=True)
    (sets / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
    return names
