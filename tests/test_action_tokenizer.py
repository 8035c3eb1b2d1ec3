import numpy as np
import pytest

from edge_vla.errors import EdgeVLAError
from edge_vla.tokens.action import ActionStats, ActionTokenizer, entropy_and_margin


@pytest.fixture
def tokenizer():
    rng = np.random.default_rng(0)
    actions = rng.normal(scale=[0.3, 0.3, 0.5, 0.05, 0.05, 0.1, 1.0], size=(5000, 7))
    actions[:, -1] = np.sign(actions[:, -1])
    return ActionTokenizer(ActionStats.from_actions(actions), first_token_id=1000), actions


def test_round_trip_error_is_at_most_half_a_bin_inside_the_range(tokenizer):
    tok, actions = tokenizer
    low, high = np.array(tok.stats.q01), np.array(tok.stats.q99)
    inside = actions[((actions >= low) & (actions <= high)).all(1)]
    decoded = tok.decode(tok.encode(inside))
    err = np.abs(decoded - inside)[:, :6]
    assert (err <= tok.half_bin_width[:6] + 1e-9).all()
    # not trivially zero: the bins really quantise
    assert err.max() > 0.2 * tok.half_bin_width[:6].max()


def test_values_outside_the_range_are_clipped_to_the_edge_bins(tokenizer):
    tok, _ = tokenizer
    high = np.array(tok.stats.q99) + 10.0
    low = np.array(tok.stats.q01) - 10.0
    assert (tok.to_bins(high[None])[0, :6] == 255).all()
    assert (tok.to_bins(low[None])[0, :6] == 0).all()
    back = tok.decode(tok.encode(high[None]))[0]
    assert (back[:6] <= np.array(tok.stats.q99)[:6]).all()


def test_gripper_is_binarised_to_libero_open_close(tokenizer):
    tok, _ = tokenizer
    a = np.zeros((2, 7))
    a[0, -1], a[1, -1] = -0.7, 0.3
    out = tok.decode(tok.encode(a))
    assert out[0, -1] == pytest.approx(-1.0) and out[1, -1] == pytest.approx(1.0)


def test_token_ids_are_the_contiguous_action_block(tokenizer):
    tok, actions = tokenizer
    ids = tok.encode(actions[:10])
    assert ids.min() >= 1000 and ids.max() < 1256


def test_chunks_flatten_step_major_and_decode_back(tokenizer):
    tok, actions = tokenizer
    chunk = actions[:4]
    ids = tok.encode(chunk).reshape(-1)
    assert ids.shape == (28,)
    back = tok.decode(ids)
    assert back.shape == (4, 7)
    np.testing.assert_allclose(back, tok.decode(tok.encode(chunk)))


def test_bad_actions_raise_clear_errors(tokenizer):
    tok, _ = tokenizer
    with pytest.raises(EdgeVLAError, match="dimensions"):
        tok.encode(np.zeros((1, 6)))
    with pytest.raises(EdgeVLAError, match="NaN"):
        tok.encode(np.full((1, 7), np.nan))
    with pytest.raises(EdgeVLAError, match="not an action token"):
        tok.decode(np.array([5] * 7))
    with pytest.raises(EdgeVLAError, match="multiple"):
        tok.decode(np.arange(1000, 1005))


def test_stats_save_load_and_malformed(tmp_path, tokenizer):
    tok, _ = tokenizer
    p = tmp_path / "stats.json"
    tok.stats.save(p)
    assert ActionStats.load(p).q99 == tok.stats.q99
    p.write_text("{not json")
    with pytest.raises(EdgeVLAError, match="not valid JSON"):
        ActionStats.load(p)
    with pytest.raises(EdgeVLAError, match="not found"):
        ActionStats.load(tmp_path / "missing.json")


def test_entropy_and_margin_separate_confident_from_uncertain():
    confident = np.array([[10.0, 0, 0, 0]])
    flat = np.zeros((1, 4))
    e1, m1 = entropy_and_margin(confident)
    e2, m2 = entropy_and_margin(flat)
    assert e1 < 0.01 < e2 and e2 == pytest.approx(np.log(4)) and m1 > 0.99 and m2 == pytest.approx(0)


def test_a_constant_dimension_decodes_to_its_constant_from_every_bin():
    """An expert that never rotates gives q01 == q99 == 0 for the rotation dims: every token there
    must decode to exactly 0 (not to a spread of bin centres up to +1), and round-trip exactly."""
    acts = np.random.default_rng(0).uniform(-1, 1, (200, 7))
    acts[:, 3] = 0.0
    acts[:, 4] = 0.25
    tok = ActionTokenizer(ActionStats.from_actions(acts), first_token_id=100, n_bins=256)
    every_bin = np.tile(np.arange(256)[:, None], (1, 7))
    decoded = tok.from_bins(every_bin)
    assert (decoded[:, 3] == 0.0).all() and (decoded[:, 4] == 0.25).all()
    assert np.ptp(decoded[:, 0]) > 1.5  # the moving dims still span their range
    assert (tok.decode(tok.encode(acts))[:, 3:5] == acts[:, 3:5]).all()
    assert (tok.centers_env()[:, 3] == 0.0).all()


def test_statistics_with_released_conventions_are_refused_by_readers_that_predate_them():
    """edge-vla's own statistics stay schema 1 (every version reads them); a mask, OpenVLA bins or a
    gripper map make them schema 2, which a reader of schema 1 alone refuses instead of decoding
    them with uniform bins."""
    from edge_vla.tokens.action import ActionStats

    own = ActionStats.from_actions(np.random.default_rng(0).uniform(-1, 1, (50, 7)))
    assert own.to_dict()["schema_version"] == 1
    released = ActionStats.from_dict({**own.to_dict(), "bin_layout": "openvla", "mask": [True] * 6 + [False]})
    d = released.to_dict()
    assert d["schema_version"] == 2
    assert ActionStats.from_dict(d).bin_layout == "openvla"  # this version reads both
    with pytest.raises(EdgeVLAError, match="schema version 3"):
        ActionStats.from_dict({**d, "schema_version": 3})
