"""The processor that turns an observation into model inputs.

It runs on `tokenizers` and numpy only (no torch, no transformers), so the ONNX runtime
path uses exactly the same code as training.
"""

from __future__ import annotations


import numpy as np

from edge_vla.errors import EdgeVLAError
from edge_vla.model.image import check_image, preprocess_image, resize_pil_bicubic
from edge_vla.tokens.reasoning import build_prompt
from edge_vla.tokens.text import TextTokenizer

def square(image, strategy: str, fill=(0, 0, 0), name: str = "image") -> np.ndarray:
    """A frame made square before the resize: "resize-naive" leaves it (the resize stretches it),
    "letterbox" pads the short side equally with `fill`, "resize-crop" keeps the centre square
    (a resize of the short side then a centre crop, as timm's eval transform, crops the same)."""
    a = check_image(image, name)
    h, w = a.shape[:2]
    if strategy == "resize-naive" or h == w:
        return a
    if strategy == "letterbox":
        side = max(h, w)
        out = np.empty((side, side, 3), np.uint8)
        out[:] = np.asarray(fill, np.uint8)
        top, left = (side - h) // 2, (side - w) // 2
        out[top:top + h, left:left + w] = a
        return out
    if strategy == "resize-crop":
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        return a[top:top + side, left:left + side]
    raise EdgeVLAError(f"unknown resize strategy `{strategy}`", "use resize-naive, letterbox or resize-crop")


def center_crop(image: np.ndarray, area: float, size: int) -> np.ndarray:
    """OpenVLA's LIBERO test-time crop: the centre box of `area` of the frame (side sqrt(area)),
    resized to size x size the way TF's crop_and_resize samples it (bilinear at
    y1 (H-1) + i (y2-y1)(H-1)/(size-1)), in float32, then back to uint8 as TF's
    convert_image_dtype(saturate) does (x * 255.5, truncated)."""
    x = image.astype(np.float32) * np.float32(1.0 / 255.0)
    side = np.float32(min(max(np.sqrt(np.float32(area)), 0.0), 1.0))
    lo = (np.float32(1.0) - side) / np.float32(2.0)
    hi = lo + side

    def axis(n):
        pos = lo * np.float32(n - 1) + np.arange(size, dtype=np.float32) * ((hi - lo) * np.float32(n - 1) / np.float32(size - 1))
        a = np.floor(pos).astype(np.int64)
        b = np.minimum(np.ceil(pos).astype(np.int64), n - 1)
        return a, b, (pos - a).astype(np.float32)

    t, b, yl = axis(x.shape[0])
    l, r, xl = axis(x.shape[1])
    xl = xl[None, :, None]
    top = x[t][:, l] + (x[t][:, r] - x[t][:, l]) * xl
    bottom = x[b][:, l] + (x[b][:, r] - x[b][:, l]) * xl
    out = np.clip(top + (bottom - top) * yl[:, None, None], 0.0, 1.0)
    return np.clip(out * np.float32(255.5), 0, 255).astype(np.uint8)


def prismatic_frame(image, size: int, strategy: str, fill=(0, 0, 0), name: str = "image") -> np.ndarray:
    """A frame as Prismatic's image transform hands it to ToTensor (uint8 size x size): its resize
    strategy with torchvision's transforms on a PIL image, every resize Pillow's bicubic.

    resize-naive   Resize((size, size))
    letterbox      LetterboxPad (int((max - w) / 2) columns and int((max - h) / 2) rows of `fill` on
                   both sides: an odd difference leaves the frame one pixel short of square, which
                   the resize then stretches), then Resize((size, size))
    resize-crop    timm's eval transform at crop_pct 1.0: Resize(size) of the short side (the long
                   side int(size * long / short)), then CenterCrop(size) (offsets rounded)"""
    a = check_image(image, name)
    h, w = a.shape[:2]
    if strategy == "letterbox":
        side = max(h, w)
        ph, pv = int((side - w) / 2), int((side - h) / 2)
        out = np.empty((h + 2 * pv, w + 2 * ph, 3), np.uint8)
        out[:] = np.asarray(fill, np.uint8)
        out[pv:pv + h, ph:ph + w] = a
        a, strategy = out, "resize-naive"
    if strategy == "resize-naive":
        return resize_pil_bicubic(a, size, size)
    if strategy == "resize-crop":
        short, long = min(h, w), max(h, w)
        long = int(size * long / short)
        a = resize_pil_bicubic(a, *((long, size) if h > w else (size, long)))
        top, left = int(round((a.shape[0] - size) / 2.0)), int(round((a.shape[1] - size) / 2.0))
        return a[top:top + size, left:left + size]
    raise EdgeVLAError(f"unknown resize strategy `{strategy}`", "use resize-naive, letterbox or resize-crop")


class VLAProcessor:
    """Observation -> model inputs: images, prompt ids, proprio state. The one place it happens."""

    def __init__(self, config, tokenizer: TextTokenizer):
        self.config = config
        self.tokenizer = tokenizer

    def images(self, images) -> np.ndarray:
        """A dict camera -> uint8 HxWx3 (or a list in config.cameras order) -> (n_cams, 3, S, S) float32."""
        cams = self.config.cameras
        if isinstance(images, dict):
            missing = [c for c in cams if c not in images]
            if missing:
                raise EdgeVLAError(f"observation lacks camera image(s) {missing}", f"this model reads cameras {list(cams)}")
            frames = [images[c] for c in cams]
        else:
            frames = list(images) if not isinstance(images, np.ndarray) or images.ndim == 4 else [images]
            if len(frames) != len(cams):
                raise EdgeVLAError(f"got {len(frames)} image(s), this model reads {len(cams)} ({list(cams)})")
        c = self.config
        scale = float(getattr(c, "center_crop_scale", 1.0))
        if scale < 1.0:
            frames = [center_crop(check_image(f, f"image `{n}`"), scale, c.image_size) for f, n in zip(frames, cams)]
        strategy = getattr(c, "resize_strategy", "resize-naive")
        if getattr(c, "vision_backbone", "hf") == "prismatic":
            # Imported OpenVLA / ECoT / MiniVLA: Prismatic's own transform (Pillow bicubic), exact
            # at any frame size; a frame already at the model's size passes unchanged.
            frames = [f if np.shape(f)[:2] == (c.image_size, c.image_size) else
                      prismatic_frame(f, c.image_size, strategy, self._fill(), name=f"image `{n}`")
                      for f, n in zip(frames, cams)]
        return np.stack([preprocess_image(square(f, strategy, self._fill(), name=f"image `{n}`"), c.image_size,
                                          c.image_mean, c.image_std, name=f"image `{n}`")
                         for f, n in zip(frames, cams)])

    def _fill(self) -> tuple[int, int, int]:
        # Prismatic pads with the (first) tower's mean colour, in 0-255.
        norms = getattr(self.config, "tower_norms", None)
        mean = norms[0][0] if norms else self.config.image_mean
        return tuple(int(m * 255) for m in mean)

    def state(self, state) -> np.ndarray:
        d = self.config.proprio_dim
        if not self.config.use_proprio:
            return np.zeros((d,), np.float32)
        if state is None:
            raise EdgeVLAError("this model reads the proprio state but none was given", f"pass a {d}-D `state`")
        s = np.asarray(state, dtype=np.float32).reshape(-1)
        if s.shape[0] != d:
            raise EdgeVLAError(f"proprio state has {s.shape[0]} values, the model expects {d}", "pass the robot state in the training layout")
        if not np.isfinite(s).all():
            raise EdgeVLAError("proprio state contains NaN or Inf", "check the robot's state reading")
        return s

    def prompt_ids(self, instruction: str) -> list[int]:
        template = getattr(self.config, "prompt_template", "")
        if template:
            if not str(instruction).strip():
                raise EdgeVLAError("the instruction is empty", "pass the task's language instruction")
            ids = self.tokenizer.encode(template.format(instruction=str(instruction).lower()))
        else:
            ids = self.tokenizer.encode(build_prompt(instruction))
        bos = self.tokenizer.bos_id
        if getattr(self.config, "image_after_bos", False):
            # The first token is the first prefix token, before the image (VLA.encode_prefix); a
            # template that writes it (MiniVLA's <|im_start|>) has it removed here.
            return ids[1:] if ids and ids[0] == bos else ids
        return ([bos] if bos is not None else []) + ids
