"""Parallel action decoding (VLAConfig.parallel_actions, OpenVLA-OFT style): placeholder inputs at the
action positions in training, the whole chunk from one decoder pass at test time, the same on every
backend and in the exported bundle."""

import json

import numpy as np
import pytest
import torch

from conftest import INSTRUCTIONS, make_samples
from edge_vla.errors import EdgeVLAError
from edge_vla.data.observations import sample_to_obs
from edge_vla.runtime.policy import Policy
from edge_vla.runtime.torch_backend import TorchBackend
from edge_vla.tokens.action import ActionStats
from edge_vla.tokens.sequence import parallel_action_inputs, placeholder_id


def _vla(parallel=True, chunk=2, seed=0):
    from edge_vla.model.vla import VLA

    s = make_samples(8)
    stats = ActionStats.from_actions(np.stack([x.action for x in s]))
    torch.manual_seed(seed)
    return VLA.from_preset("tiny", [f"action_chunk={chunk}", f"parallel_actions={str(parallel).lower()}"],
                           texts=INSTRUCTIONS, action_stats=stats)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A chunk-2 parallel model trained by the trainer (recipe rows carry the placeholders; 100 steps
    memorise these samples, measured 100% direct-mode token accuracy)."""
    from edge_vla.train.config import TrainConfig
    from edge_vla.train.trainer import train

    data = make_samples(8, seed=3)
    for i, s in enumerate(data):  # chunks of 2 actions
        s.action = np.stack([s.action, np.roll(s.action, i)]).astype(np.float32)
    out = tmp_path_factory.mktemp("par") / "run"
    cfg = TrainConfig(recipe="vla", steps=100, batch_size=8, warmup_steps=2, lr=3e-3, log_every=10,
                      augment_shift=0,
                      val_fraction=0.0, action_chunk=2, model={"parallel_actions": True})
    final = train(cfg, data, out, show_progress=False)
    return final, data


def test_placeholders_replace_only_the_action_inputs():
    ids = [1, 2, 3, 9, 10, 11, 12, 0]  # prompt, " ACTION:", 4 action tokens, eos
    assert parallel_action_inputs(ids, 4, 5) == [1, 2, 3, 5, 5, 5, 5, 0]
    with pytest.raises(ValueError):
        parallel_action_inputs([1, 2], 4, 5)


def test_recipe_rows_of_a_parallel_model_feed_placeholders_with_unchanged_labels():
    from edge_vla.train.data import RecipeDataset
    from edge_vla.train.recipes import get_recipe

    s = make_samples(2)
    for x in s:
        x.action = np.stack([x.action, x.action])
    rows = {}
    for parallel in (False, True):
        vla = _vla(parallel)
        ds = RecipeDataset(s, get_recipe("vla"), vla.processor, vla.action_tokenizer)
        rows[parallel] = ds.row(s[0], np.random.default_rng(0), None)
    n = 14
    a, b = rows[False], rows[True]
    assert a["labels"] == b["labels"] and a["input_ids"][:-(n + 1)] == b["input_ids"][:-(n + 1)]
    assert b["input_ids"][-(n + 1):-1] == [placeholder_id(vla.processor.tokenizer)] * n
    assert a["input_ids"][-(n + 1):-1] == a["labels"][-(n + 1):-1]  # the sequential model sees the actions


def test_policy_decodes_the_chunk_as_one_teacher_free_forward_pass():
    vla = _vla().eval()
    s = make_samples(3)
    tok = vla.processor.tokenizer
    lo, n = tok.first_action_id, vla.config.n_action_tokens
    from edge_vla.tokens.sequence import action_prefix_ids

    policy = Policy(TorchBackend(vla), mode="direct")
    for x in s:
        pv, ids, st = vla.model_inputs(x.images, x.instruction, x.state, action_prefix_ids(tok))
        full = torch.cat([ids, torch.full((1, n - 1), placeholder_id(tok))], 1)
        with torch.no_grad():
            logits = vla(pv, full, state=st).logits[0, -n:, lo:lo + tok.n_bins]
        assert policy.act(sample_to_obs(x)).info["action_token_ids"] == (logits.argmax(-1) + lo).tolist()


def test_policy_direct_mode_is_one_decoder_pass_and_full_mode_one_after_the_reasoning(trained):
    from edge_vla.model.vla import VLA

    final, data = trained
    vla = VLA.from_pretrained(final)
    assert vla.config.parallel_actions and vla.config.n_action_tokens == 14
    be = TorchBackend(vla)
    direct = Policy(be, mode="direct").act(sample_to_obs(data[0]))
    assert direct.timings["body"] == [] and direct.tokens["action"] == 14  # everything in the prefill
    full = Policy(be, mode="full", max_free_tokens=8).act(sample_to_obs(data[0]))
    # one step per reasoning token fed, then one for the placeholders
    assert len(full.timings["body"]) == full.tokens["reasoning"] + 1 + int(full.info["forced_action_prefix"])
    # The trainer taught it: direct mode reproduces the training actions of these samples.
    at = vla.action_tokenizer
    hits = [np.mean(np.asarray(Policy(be, mode="direct").act(sample_to_obs(x)).info["action_token_ids"])
                    == at.encode(x.action).reshape(-1)) for x in data]
    assert np.mean(hits) > 0.9


def test_bundle_decodes_the_same_chunk_without_torch(trained, tmp_path):
    from edge_vla.export import export_bundle
    from edge_vla.artifacts.bundle import HIDDEN_ALL, load_bundle
    from edge_vla.model.vla import VLA
    from edge_vla.runtime.ort_backend import OrtBackend

    final, data = trained
    out = export_bundle(final, tmp_path / "b", precision="fp32", parity_samples=data[:2], report=lambda *_: None)
    bundle = load_bundle(out)
    assert bundle.manifest["parity"]["parallel_chunk_agreement"] == 1.0
    assert HIDDEN_ALL in bundle.graphs["decoder"]["outputs"] and bundle.graphs["decoder"]["form"] == "onnxruntime-fused"
    ort, torch_be = OrtBackend(bundle), TorchBackend(VLA.from_pretrained(final))
    for mode in ("direct", "full"):
        for x in data[:3]:
            a = Policy(torch_be, mode=mode, max_free_tokens=8).act(sample_to_obs(x))
            b = Policy(ort, mode=mode, max_free_tokens=8).act(sample_to_obs(x))
            assert a.info["action_token_ids"] == b.info["action_token_ids"]
            np.testing.assert_allclose(a.action, b.action, atol=1e-6)
    # No action token is fed back, so teacher forcing changes nothing in direct mode.
    from edge_vla.export.accuracy import accuracy_report

    noisy = VLA.from_pretrained(final)
    with torch.no_grad():
        for p in noisy.lm.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.5 * p.std().clamp_min(1e-3))
    rep = accuracy_report(Policy(ort), Policy(TorchBackend(noisy)), [sample_to_obs(x) for x in data])["direct"]
    assert rep["action_token_agreement_tf"] == rep["action_token_agreement"] < 1.0


def test_parallel_models_are_refused_where_they_cannot_run(trained, tmp_path):
    from edge_vla.export import export_bundle
    from edge_vla.train.config import TrainConfig
    from edge_vla.train.trainer import build_model

    final, _ = trained
    with pytest.raises(EdgeVLAError, match="TensorRT"):
        export_bundle(final, tmp_path / "b", precision="fp32", target="orin-agx-64", report=lambda *_: None)
    stats = json.loads((final / "action_stats.json").read_text())
    with pytest.raises(EdgeVLAError, match="cannot change the pretrained"):
        build_model(TrainConfig(init_from=str(final), model={"lm": {"hidden_size": 64}}), [],
                    ActionStats.from_dict(stats))
    off = build_model(TrainConfig(init_from=str(final), model={"parallel_actions": False}), [],
                      ActionStats.from_dict(stats))
    assert off.config.parallel_actions is False


@pytest.mark.parametrize("fused", [True, False])
def test_both_decoder_forms_output_every_new_positions_hidden_state(tmp_path, fused):
    """The fused (ONNX Runtime) and the torch-exported decoder of a parallel model give hidden_all
    equal to PyTorch's last hidden states, prefill and a multi-token step after a cache."""
    import onnxruntime as ort

    from edge_vla.artifacts.bundle import HIDDEN_ALL, decoder_feeds
    from edge_vla.export.onnx_export import export_graphs

    vla = _vla().eval()
    graphs = export_graphs(vla, tmp_path, fused_decoder=fused)
    assert HIDDEN_ALL in graphs["decoder"]["outputs"]
    sess = ort.InferenceSession(str(tmp_path / graphs["decoder"]["file"]), providers=["CPUExecutionProvider"])
    n_layers, n_kv, hd = graphs["decoder"]["n_layers"], graphs["decoder"]["n_kv_heads"], graphs["decoder"]["head_dim"]
    dec = graphs["decoder"]
    past = [np.zeros((1, n_kv, 0, hd), np.float32)] * len(dec["inputs"][1:])
    emb = torch.randn(1, 9, vla.lm.config.hidden_size, generator=torch.Generator().manual_seed(0))
    names = [o.name for o in sess.get_outputs()]
    out = dict(zip(names, sess.run(None, decoder_feeds(dec, emb[:, :6].numpy(), past))))
    present = [out[n.replace("past", "present")] for n in dec["inputs"][1:]]
    out2 = dict(zip(names, sess.run(None, decoder_feeds(dec, emb[:, 6:].numpy(), present))))
    with torch.no_grad():
        ref = vla.lm.get_decoder()(inputs_embeds=emb).last_hidden_state[0].numpy()
    np.testing.assert_allclose(out[HIDDEN_ALL][0], ref[:6], atol=1e-4)
    np.testing.assert_allclose(out2[HIDDEN_ALL][0], ref[6:], atol=1e-4)
    np.testing.assert_allclose(out2["hidden"][0], ref[-1], atol=1e-4)


def test_ecot_with_parallel_actions_reasons_then_decodes_its_chunk_in_one_pass(tmp_path):
    """The fair full-CoT baseline: `ecot` trained with model.parallel_actions=true writes its
    reasoning token by token, then decodes the whole chunk in ONE decoder pass (the sequential
    `ecot` takes one pass per action token), with validation and the export's parity working."""
    from edge_vla.artifacts.bundle import load_bundle
    from edge_vla.export import export_bundle
    from edge_vla.model.vla import VLA
    from edge_vla.runtime.ort_backend import OrtBackend
    from edge_vla.train.config import load_train_config
    from edge_vla.train.trainer import train

    data = make_samples(8, seed=3)
    for i, s in enumerate(data):  # chunks of 2 actions: 14 action tokens
        s.action = np.stack([s.action, np.roll(s.action, i)]).astype(np.float32)
    # The documented command's overrides (docs/training.md), through the CLI's config loader.
    cfg = load_train_config(None, ["steps=4", "batch_size=8", "warmup_steps=1", "lr=3e-3", "augment_shift=0",
                                   "val_fraction=0.25", "val_max_samples=2", "action_chunk=2",
                                   "model.parallel_actions=true"], recipe="ecot")
    final = train(cfg, data, tmp_path / "run", show_progress=False)
    val = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if "val/" in x]
    assert val and "val/action_token_acc" in val[-1]  # validation decoded it (full mode, parallel chunk)

    vla = VLA.from_pretrained(final)
    assert vla.config.parallel_actions and vla.recipe_info["decode_mode"] == "full"
    n = vla.config.n_action_tokens
    obs = sample_to_obs(data[0])
    r = Policy(TorchBackend(vla), max_free_tokens=12).act(obs)  # the recipe's own mode: full
    assert r.info["mode"] == "full"
    forced = int(r.info["forced_action_prefix"])
    fed = r.tokens["reasoning"] - len(vla.recipe_info["reasoning_prefix_ids"])  # the prefix is in the prefill
    assert r.tokens["action"] == n
    # one body step per reasoning token fed (the forced action prefix is one more), then ONE for the chunk
    assert len(r.timings["body"]) == fed + forced + 1
    # The same weights decoded sequentially take a pass per action token after the first.
    vla_seq = VLA.from_pretrained(final)
    vla_seq.config.parallel_actions = False
    s = Policy(TorchBackend(vla_seq), max_free_tokens=12).act(obs)
    assert len(s.timings["body"]) == fed + int(s.info["forced_action_prefix"]) + n - 1
    assert s.tokens["reasoning"] == r.tokens["reasoning"]  # the same reasoning, only the chunk differs

    out = export_bundle(final, tmp_path / "b", precision="fp32", parity_samples=data[:2], report=lambda *_: None)
    bundle = load_bundle(out)
    assert bundle.manifest["parity"]["parallel_chunk_agreement"] == 1.0
    b = Policy(OrtBackend(bundle), max_free_tokens=12).act(obs)
    assert b.info["action_token_ids"] == r.info["action_token_ids"] and b.reasoning_text == r.reasoning_text
