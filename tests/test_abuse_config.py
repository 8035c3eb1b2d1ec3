"""`--set` overrides: an unknown key at any depth is refused with the closest name, including keys
inside the Hugging Face config dicts (vision, lm), checked against the config class of their
model_type; a typo never reaches config.json."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from conftest import INSTRUCTIONS, random_demos
from edge_vla.config import apply_overrides, hf_config_keys, preset
from edge_vla.errors import EdgeVLAError


@pytest.mark.parametrize("override,closest", [
    ("lm.num_hiden_layers=2", "lm.num_hidden_layers"),
    ("lm.hiden_size=64", "lm.hidden_size"),
    ("vision.patch_sise=4", "vision.patch_size"),
    ("image_sise=3", "image_size"),
    ("lm.rope_parameters.rope_theta=1", "lm.rope_theta"),  # no such section in the preset's lm dict
])
def test_unknown_keys_at_any_depth_are_refused_with_the_closest_name(override, closest):
    with pytest.raises(EdgeVLAError, match=f"did you mean `{closest}`") as e:
        preset("tiny", [override])
    assert "\n" not in str(e.value)


def test_known_hugging_face_keys_are_accepted_new_or_not():
    cfg = preset("tiny", ["lm.num_hidden_layers=2", "lm.rms_norm_eps=1e-5", "lm.rope_theta=5000",
                          "vision.layer_norm_eps=1e-5", "lm.hidden_size=64"])
    assert cfg.lm["num_hidden_layers"] == 2 and cfg.lm["rms_norm_eps"] == 1e-5 and cfg.lm["hidden_size"] == 64
    assert cfg.vision["layer_norm_eps"] == 1e-5
    assert {"num_hidden_layers", "rope_theta", "vocab_size"} <= hf_config_keys("qwen2")
    # the model_type decides, whatever order the overrides come in
    cfg = preset("tiny", ["lm.head_dim=16", "lm.model_type=llama"])
    assert cfg.lm["model_type"] == "llama" and cfg.lm["head_dim"] == 16
    with pytest.raises(EdgeVLAError, match="unknown qwen2 config key `lm.head_dim`"):
        preset("tiny", ["lm.head_dim=16"])  # Qwen2's config has no head_dim
    with pytest.raises(EdgeVLAError, match="unknown Hugging Face model_type `qwen9`.*did you mean"):
        preset("tiny", ["lm.model_type=qwen9", "lm.foo=1"])


def test_overrides_of_a_tower_loaded_from_a_path_are_refused():
    """minivla loads its LM from lm_path, which ignored `lm.*` overrides without a word."""
    with pytest.raises(EdgeVLAError, match="`lm.num_hidden_layers` has no effect: the lm tower loads from lm_path"):
        preset("minivla", ["lm.num_hidden_layers=2"])
    with pytest.raises(EdgeVLAError, match="names no model_type"):
        apply_overrides({"lm": {}, "lm_path": None}, ["lm.hidden_size=8"])


def test_train_refuses_a_nested_typo_before_writing_anything(tmp_path):
    """Item: `edge-vla train --set model.lm.num_hiden_layers=2` exited 0, wrote the typo into the
    checkpoint's config.json and built the default depth."""
    from edge_vla.cli import main
    from edge_vla.data.libero_hdf5 import write_libero_hdf5

    data = tmp_path / "ds"
    write_libero_hdf5(data / "libero_90" / "TASK_pick_up_the_butter_demo.hdf5", random_demos(4), INSTRUCTIONS[0])
    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["train", "--data", str(data), "--out", str(out), "--no-progress",
                                    "--set", "model.lm.num_hiden_layers=2", "--set", "steps=1",
                                    "--set", "batch_size=2", "--set", "warmup_steps=0", "--set", "val_fraction=0.25"])
    assert res.exit_code == 1, res.output
    assert "did you mean `lm.num_hidden_layers`" in res.output and "Traceback" not in res.output
    assert not (out / "final" / "config.json").exists() and not (out / "train_config.json").exists()
