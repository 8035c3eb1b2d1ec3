"""The processor that turns an observation into model inputs.

It runs on `tokenizers` and numpy only (no torch, no transformers), so the ONNX runtime
path uses exactly the same code as training.
"""

from __future__ import annotations


import numpy as np

from edge_vla.errors import EdgeVLAError
from edge_vla.model.image import preprocess_image
from edge_vla.tokens.reasoning import build_prompt
from edge_vla.tokens.text import TextTokenizer

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
        return np.stack([preprocess_image(f, c.image_size, c.image_mean, c.image_std, name=f"image `{n}`")
                         for f, n in zip(frames, cams)])

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
        ids = self.tokenizer.encode(build_prompt(instruction))
        return ([self.tokenizer.bos_id] if self.tokenizer.bos_id is not None else []) + ids
