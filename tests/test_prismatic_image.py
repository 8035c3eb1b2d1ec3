"""Frames that are not at the model's size enter an imported Prismatic model (OpenVLA, ECoT,
MiniVLA) as Prismatic's image transform feeds them: torchvision's Resize(BICUBIC) on a PIL image,
i.e. Pillow's bicubic resample, after each resize strategy. Checked against Pillow itself (the
reference transforms below follow Prismatic's LetterboxPad and timm's eval Resize + CenterCrop,
written with PIL as torchvision computes them)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from edge_vla.config import VLAConfig
from edge_vla.errors import EdgeVLAError
from edge_vla.model.image import preprocess_image, resize_pil_bicubic
from edge_vla.model.processor import VLAProcessor

DINO_MEAN = (0.485, 0.456, 0.406)
FILL = tuple(int(m * 255) for m in DINO_MEAN)  # Prismatic pads with DINOv2's mean colour


def _frame(h, w, seed=0, smooth=False):
    rng = np.random.default_rng(seed)
    if smooth:  # a camera-like frame: gradients plus edges
        y, x = np.mgrid[0:h, 0:w]
        a = np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), ((x // 7 + y // 5) % 2) * 255], -1)
        return a.astype(np.uint8)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _pil(a, w, h):
    return np.asarray(Image.fromarray(a).resize((w, h), Image.BICUBIC))


# Frames whose two axes both shrink or both grow (camera frames to 224 px). Pillow up to 12 always
# resamples horizontally first; Pillow 13 (installed here) runs the vertical pass first for some
# frames where one axis shrinks and the other grows, so only the common cases are compared to it.
@pytest.mark.parametrize("h, w, oh, ow", [(256, 256, 224, 224), (480, 640, 224, 224), (640, 480, 224, 224),
                                          (128, 128, 224, 224), (100, 160, 224, 224), (1000, 750, 224, 224),
                                          (300, 301, 28, 28), (17, 31, 224, 224)])
def test_resize_matches_pillow_bicubic_bit_for_bit(h, w, oh, ow):
    for smooth in (False, True):
        a = _frame(h, w, seed=h * w, smooth=smooth)
        np.testing.assert_array_equal(resize_pil_bicubic(a, oh, ow), _pil(a, ow, oh))


def _letterbox_ref(a, size):
    """Prismatic's LetterboxPad (TVF.pad with int((max - w) / 2), int((max - h) / 2)), then Resize."""
    h, w = a.shape[:2]
    side = max(h, w)
    ph, pv = int((side - w) / 2), int((side - h) / 2)
    canvas = Image.new("RGB", (w + 2 * ph, h + 2 * pv), FILL)
    canvas.paste(Image.fromarray(a), (ph, pv))
    return np.asarray(canvas.resize((size, size), Image.BICUBIC))


def _resize_crop_ref(a, size):
    """timm's eval transform at crop_pct 1.0: Resize(size) of the short side, CenterCrop(size)."""
    h, w = a.shape[:2]
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nw, nh = int(size * w / h), size
    im = Image.fromarray(a).resize((nw, nh), Image.BICUBIC)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    return np.asarray(im.crop((left, top, left + size, top + size)))


def _processor(strategy, backbone="prismatic", size=224):
    cfg = VLAConfig(image_size=size, resize_strategy=strategy, vision_backbone=backbone, image_mean=(0.0, 0.0, 0.0),
                    image_std=(1.0, 1.0, 1.0), tower_norms=[[list(DINO_MEAN), [0.229, 0.224, 0.225]]],
                    cameras=("agentview",))
    return VLAProcessor(cfg, tokenizer=None)


@pytest.mark.parametrize("strategy, ref", [("resize-naive", lambda a, s: _pil(a, s, s)),
                                           ("letterbox", _letterbox_ref), ("resize-crop", _resize_crop_ref)])
@pytest.mark.parametrize("h, w", [(480, 640), (641, 480), (256, 256), (160, 120)])
def test_a_prismatic_model_sees_the_frame_prismatic_feeds_it(strategy, ref, h, w):
    a = _frame(h, w, seed=h + w, smooth=True)
    got = _processor(strategy).images({"agentview": a})[0]
    want = ref(a, 224).astype(np.float32).transpose(2, 0, 1) / np.float32(255.0)  # ToTensor
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_frames_at_the_model_size_and_edge_vla_models_are_unchanged():
    a = _frame(224, 224, seed=3)
    got = _processor("letterbox").images({"agentview": a})[0]
    np.testing.assert_allclose(got, a.astype(np.float32).transpose(2, 0, 1) / 255.0, atol=1e-6)
    # edge-vla's own models keep the filter they were trained with (the antialiased linear one)
    b = _frame(96, 128, seed=4)
    got = _processor("resize-naive", backbone="hf", size=64).images({"agentview": b})[0]
    np.testing.assert_allclose(got, preprocess_image(b, 64, (0, 0, 0), (1, 1, 1)), atol=0)
    assert not np.allclose(got, preprocess_image(b, 64, (0, 0, 0), (1, 1, 1), resize_filter="pil-bicubic"))
    with pytest.raises(EdgeVLAError, match="unknown resize filter"):
        preprocess_image(b, 64, (0, 0, 0), (1, 1, 1), resize_filter="lanczos")
