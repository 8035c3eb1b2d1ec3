import os

# One intra-op thread: the CI machine has 2 cores and tests run beside other work.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", "egl")

import numpy as np
import pytest


def pytest_configure(config):
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass


def pytest_collection_modifyitems(config, items):
    """gpu tests skip cleanly where no CUDA GPU exists, even when selected with -m gpu."""
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


INSTRUCTIONS = ["pick up the butter and put it in the basket", "pick up the milk and put it in the basket"]


def random_demos(n: int, steps: int = 6, image_size: int = 64, seed: int = 0) -> list[dict]:
    """Random demos as edge_vla.data.libero_hdf5.write_libero_hdf5 takes them (both cameras)."""
    rng = np.random.default_rng(seed)
    return [{"actions": rng.uniform(-0.8, 0.8, (steps, 7)).astype(np.float32),
             "proprio": rng.normal(size=(steps, 8)).astype(np.float32),
             "images": {c: rng.integers(0, 256, (steps, image_size, image_size, 3), dtype=np.uint8)
                        for c in ("agentview", "wrist")}}
            for _ in range(n)]


def make_samples(n: int = 6, seed: int = 0, image_size: int = 64, with_reasoning: bool = True):
    """Small deterministic Samples with distinct images and actions (tests only)."""
    from edge_vla.data.sample import Sample
    from edge_vla.tokens.reasoning import Reasoning

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
        wrist = rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
        action = rng.uniform(-0.9, 0.9, 7).astype(np.float32)
        action[-1] = 1.0 if i % 2 else -1.0
        reasoning = None
        if with_reasoning:
            reasoning = Reasoning(
                task=INSTRUCTIONS[i % 2], plan="1. pick up the object 2. put it in the basket",
                visible_objects=[("butter", [10 + i, 12, 30, 40]), ("basket", [40, 5, 60, 30])],
                subtask_reason="the object is not grasped yet", subtask="pick up the object",
                move_reason="the gripper is above the object", move="move down",
                gripper=[(20 + i, 30), (21 + i, 31)],
            )
        out.append(Sample(images={"agentview": img, "wrist": wrist}, instruction=INSTRUCTIONS[i % 2],
                          state=rng.normal(size=8).astype(np.float32), action=action, reasoning=reasoning,
                          episode=f"ep{i // 3}", step=i % 3))
    return out


@pytest.fixture
def samples():
    return make_samples()


@pytest.fixture(scope="session")
def tiny_vla():
    """A fresh tiny VLA (random weights) with action statistics from make_samples()."""
    from edge_vla.model.vla import VLA
    from edge_vla.tokens.action import ActionStats

    s = make_samples()
    stats = ActionStats.from_actions(np.stack([x.action for x in s]))
    return VLA.from_preset("tiny", texts=INSTRUCTIONS, action_stats=stats)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, tiny_vla):
    """tiny_vla saved as a checkpoint directory (read-only: copy it before changing it)."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    tiny_vla.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_fp32_bundle(tiny_ckpt, tmp_path_factory):
    """tiny_ckpt exported with `edge-vla export --fp32` (read-only: copy it before changing it)."""
    from click.testing import CliRunner

    from edge_vla.cli import main

    out = tmp_path_factory.mktemp("fp32-bundle") / "bundle"
    res = CliRunner().invoke(main, ["export", str(tiny_ckpt), "--fp32", "-o", str(out)])
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="session")
def tiny_policy(tiny_ckpt):
    """A direct-mode Policy over tiny_ckpt on the torch backend."""
    from edge_vla.runtime.policy import load_policy

    return load_policy(tiny_ckpt, backend="torch", mode="direct")
