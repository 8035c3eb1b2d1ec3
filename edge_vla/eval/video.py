"""Rollout videos: camera views side by side with the policy's reasoning (and the step, the action)
drawn under them, written as mp4 (H.264 via imageio-ffmpeg) atomically."""

from __future__ import annotations

import os
import tempfile
import textwrap
from pathlib import Path

import numpy as np

from edge_vla.errors import MissingDependencyError

PANEL = 256  # pixels per camera view in the video
TEXT_LINES = 7
LINE_H = 13


def _font():
    from PIL import ImageFont

    return ImageFont.load_default()


def compose_frame(images: dict[str, np.ndarray], caption: str, reasoning: str | None) -> np.ndarray:
    """Camera views (canonical upright uint8) side by side, caption and wrapped reasoning below."""
    from PIL import Image, ImageDraw

    # Nearest-neighbour upscaling: display only, and cheap (the model's filter is for model inputs).
    views = [np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize((PANEL, PANEL), Image.NEAREST))
             for img in images.values()]
    top = np.concatenate(views, axis=1) if views else np.zeros((PANEL, PANEL, 3), np.uint8)
    width = top.shape[1]
    text_h = LINE_H * (TEXT_LINES + 1) + 8
    canvas = Image.new("RGB", (width, top.shape[0] + text_h), (20, 20, 20))
    canvas.paste(Image.fromarray(top), (0, 0))
    draw = ImageDraw.Draw(canvas)
    y = top.shape[0] + 4
    draw.text((6, y), caption, fill=(255, 220, 120), font=_font())
    chars = max(20, width // 6)
    lines = textwrap.wrap(reasoning or "", chars)[:TEXT_LINES]
    for i, line in enumerate(lines):
        draw.text((6, y + LINE_H * (i + 1)), line, fill=(230, 230, 230), font=_font())
    return np.asarray(canvas)


def write_mp4(path: str | Path, frames: list[np.ndarray], fps: int = 20) -> Path:
    """Encode frames to mp4; the file appears only when complete."""
    try:
        import imageio.v2 as imageio
    except ImportError as e:
        raise MissingDependencyError("imageio imageio-ffmpeg", "rollout videos") from e
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".mp4")
    os.close(fd)
    try:
        imageio.mimwrite(tmp, [np.ascontiguousarray(f) for f in frames], fps=fps, codec="libx264",
                         macro_block_size=1, quality=6)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
