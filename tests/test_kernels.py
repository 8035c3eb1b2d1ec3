"""One test suite for every implementation of the fused action-decode op (edge_vla.kernels).

Tokens must equal the reference exactly, values to float tolerance, on random and adversarial
inputs: exact ties (resolved to the lowest bin), all-equal rows, extreme magnitudes (exact
multiples of 2^100, logits overflowing to +inf), one row and many, H not a multiple of the
Triton block, batched (B, T, H) layouts, active clipping, and an action-head bias.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest

from edge_vla.errors import EdgeVLAError
from edge_vla.kernels import IMPLEMENTATIONS, available_implementations, run_implementation
from edge_vla.kernels.reference import action_dims, action_head_rows, action_value_table, decode_actions_numpy

D = 7
N_BINS = 256


def _table(rng, d=D, n_bins=N_BINS):
    values = rng.normal(size=(n_bins, d)).astype(np.float32)
    return values, np.full(d, -1.2, np.float32), np.full(d, 1.2, np.float32)  # some values get clipped


def make_cases() -> dict[str, dict]:
    """name -> inputs dict (numpy). Deterministic."""
    rng = np.random.default_rng(1234)
    cases: dict[str, dict] = {}

    def add(name, h, w, dim, bias=None, table=None):
        values, low, high = table if table is not None else _table(rng, n_bins=w.shape[0])
        cases[name] = dict(hidden=h.astype(np.float32), weight=w.astype(np.float32), dim=np.asarray(dim, np.int64),
                           values=values, low=low, high=high, bias=None if bias is None else bias.astype(np.float32))

    # Random: one row, one action (7 rows), H not a multiple of the 64-wide Triton block.
    add("random_n1", rng.normal(size=(1, 33)), rng.normal(size=(N_BINS, 33)), [3])
    add("random_n7_h96", rng.normal(size=(7, 96)), rng.normal(size=(N_BINS, 96)), action_dims(7, D))
    add("random_bias", rng.normal(size=(7, 70)), rng.normal(size=(N_BINS, 70)), action_dims(7, D),
        bias=rng.normal(size=N_BINS))
    add("random_many", rng.normal(size=(96, 130)), rng.normal(size=(N_BINS, 130)), action_dims(96, D))
    add("random_large_magnitude", rng.normal(size=(14, 64)) * 1e15, rng.normal(size=(N_BINS, 64)) * 1e15,
        action_dims(14, D, start=3))
    add("odd_bins", rng.normal(size=(5, 40)), rng.normal(size=(37, 40)), action_dims(5, D))

    # Exact ties: small integers make every dot product exact in float32, in any summation order.
    h = rng.integers(-3, 4, size=(21, 50))
    w = rng.integers(-3, 4, size=(N_BINS, 50))
    best = (h @ w.T).argmax(1)
    for r in range(21):  # copy the winning weight row to later bins -> ties that must go to the lowest
        for j in (best[r] + 1 + r, N_BINS - 1 - r):
            if j < N_BINS:
                w[j] = w[best[r]] if j > best[r] else w[j]
    add("exact_ties", h, w, action_dims(21, D))
    # A tie between two earlier bins and a later one, with bias making them tie too.
    w2 = np.zeros((N_BINS, 8))
    w2[[10, 40, 200], 0] = 1.0
    b2 = np.zeros(N_BINS)
    b2[[5]] = 1.0
    add("ties_with_bias", np.tile(np.eye(8)[0], (3, 1)), w2, [0, 1, 6], bias=b2)
    # All-equal rows: every logit identical -> bin 0.
    add("all_equal_zero", np.zeros((7, 65)), rng.normal(size=(N_BINS, 65)), action_dims(7, D))
    add("all_equal_weight", rng.normal(size=(7, 65)), np.tile(rng.normal(size=(1, 65)), (N_BINS, 1)), action_dims(7, D))
    # Extreme values: exact multiples of 2^100 (~1.3e30) and logits that overflow to +inf (all tie -> bin 0).
    big = float(2.0 ** 100)
    add("extreme_exact", rng.integers(-2, 3, size=(7, 64)) * big, rng.integers(-2, 3, size=(N_BINS, 64)),
        action_dims(7, D))
    add("overflow_inf", np.full((7, 40), 1e30), np.full((N_BINS, 40), 1e10), action_dims(7, D))
    w3 = np.abs(rng.normal(size=(N_BINS, 40)))
    w3[77] = 1e12  # one row overflows to +inf, the others stay finite
    add("one_row_inf", np.full((3, 40), 1e30), w3, [0, 1, 2])
    add("huge_negative", -np.abs(rng.normal(size=(7, 40))) * 1e18, np.abs(rng.normal(size=(N_BINS, 40))) * 1e18,
        action_dims(7, D))
    # Batched layout (B, T, H) with dim (T,).
    add("batched", rng.normal(size=(3, 7, 48)), rng.normal(size=(N_BINS, 48)), action_dims(7, D))
    return cases


CASES = make_cases()


def _expected(case):
    return decode_actions_numpy(**case)


def _assert_match(name, got, want):
    gb, ga = got
    wb, wa = want
    assert gb.shape == wb.shape and ga.shape == wa.shape, name
    np.testing.assert_array_equal(gb, wb, err_msg=f"{name}: bins differ")
    np.testing.assert_allclose(ga, wa, rtol=1e-6, atol=0, err_msg=f"{name}: actions differ")


def test_adversarial_cases_have_the_intended_answers():
    """The spec's tie and overflow rules, stated as numbers (guards the case generator itself)."""
    bins, _ = _expected(CASES["ties_with_bias"])
    assert bins.tolist() == [5, 5, 5]  # bias 1 at bin 5 ties with the weight rows 10, 40, 200
    assert (_expected(CASES["overflow_inf"])[0] == 0).all()
    assert (_expected(CASES["one_row_inf"])[0] == 77).all()
    assert (_expected(CASES["all_equal_zero"])[0] == 0).all()
    c = CASES["exact_ties"]
    logits = c["hidden"].astype(np.int64) @ c["weight"].astype(np.int64).T
    top = logits.max(1, keepdims=True)
    assert ((logits == top).sum(1) >= 2).sum() >= 10  # most rows really tie
    np.testing.assert_array_equal(_expected(c)[0], np.argmax(logits == top, axis=1))  # lowest index wins


@pytest.mark.parametrize("impl", ["reference", "onnx"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_cpu_implementations_match_the_numpy_twin(impl, case):
    _assert_match(f"{impl}/{case}", run_implementation(impl, **CASES[case]), _expected(CASES[case]))


def test_clipping_and_per_row_dimension():
    c = CASES["random_many"]
    bins, actions = _expected(c)
    raw = c["values"][bins, c["dim"]]
    assert np.any(np.abs(raw) > 1.2)  # the case really clips
    np.testing.assert_array_equal(actions, np.clip(raw, -1.2, 1.2))


TRITON_SCRIPT = r"""
import os, sys, json
os.environ["TRITON_INTERPRET"] = "1"
import numpy as np
from edge_vla.kernels import run_implementation
src, dst = sys.argv[1], sys.argv[2]
data = np.load(src, allow_pickle=False)
names = json.loads(str(data["names"]))
out = {}
for n in names:
    kw = {k: data[f"{n}/{k}"] for k in ("hidden", "weight", "dim", "values", "low", "high")}
    kw["bias"] = data[f"{n}/bias"] if f"{n}/bias" in data else None
    b, a = run_implementation("triton", **kw)
    out[f"{n}/bins"], out[f"{n}/actions"] = b, a
np.savez(dst, **out)
"""


def test_interpreted_triton_matches_the_reference(tmp_path):
    """Triton under TRITON_INTERPRET=1 on CPU tensors, in a fresh process (triton reads the flag
    when the kernel is decorated, and other tests may have imported triton already)."""
    pytest.importorskip("triton")
    arrays = {"names": json.dumps(sorted(CASES))}
    for n, c in CASES.items():
        for k, v in c.items():
            if v is not None:
                arrays[f"{n}/{k}"] = v
    np.savez(tmp_path / "cases.npz", **arrays)
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", TRITON_SCRIPT, str(tmp_path / "cases.npz"), str(tmp_path / "out.npz")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = np.load(tmp_path / "out.npz")
    for n, c in CASES.items():
        _assert_match(f"triton/{n}", (out[f"{n}/bins"], out[f"{n}/actions"]), _expected(c))


@pytest.mark.parametrize("capability,has_bias", [(87, False), (90, True)])
def test_triton_kernel_compiles_ahead_of_time_for_gpus(capability, has_bias):
    """Triton's own compiler (ptxas included) builds the kernel for sm_87 (Jetson Orin) and
    sm_90 (H100) without a GPU: the compiled path is at least well-formed."""
    pytest.importorskip("triton")
    from edge_vla.kernels.triton_kernel import compile_for

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = compile_for(capability, has_bias=has_bias)
    assert not [w for w in caught if "FP_FUSION" in str(w.message)]  # fusion asked for, not defaulted
    assert ".entry action_decode_kernel" in out["ptx"] and len(out["cubin"]) > 1000
    assert f".target sm_{capability}" in out["ptx"]


def test_value_table_reproduces_action_tokenizer_decode():
    """The fused op and ActionTokenizer.decode are one de-normalisation (gripper snap included)."""
    from edge_vla.tokens.action import ActionStats, ActionTokenizer

    rng = np.random.default_rng(0)
    acts = rng.normal(size=(500, D)) * [0.3, 0.2, 0.5, 0.05, 0.05, 0.1, 1]
    acts[:, -1] = np.sign(acts[:, -1])
    acts[:, 4] = 0.25  # a constant dimension
    tok = ActionTokenizer(ActionStats.from_actions(acts), first_token_id=1000)
    values, low, high = action_value_table(tok)
    assert values.shape == (N_BINS, D) and values.dtype == np.float32
    bins = rng.integers(0, N_BINS, size=(40, D))
    want = tok.decode(bins + 1000)
    # A one-hot hidden state over the bin axis makes the restricted head pick exactly `bins`.
    eye = np.eye(N_BINS, dtype=np.float32)
    got_bins, got = decode_actions_numpy(eye[bins.reshape(-1)], eye, action_dims(40 * D, D), values, low, high)
    np.testing.assert_array_equal(got_bins, bins.reshape(-1))
    np.testing.assert_allclose(got.reshape(40, D), want, rtol=1e-6, atol=1e-6)
    assert set(np.unique(got.reshape(40, D)[:, -1])) <= {np.float32(tok.low[-1]), np.float32(tok.high[-1])}


def test_restricted_head_reproduces_the_reference_decoder(tiny_vla):
    """On the real tiny VLA, the fused op on the decoder's hidden states gives exactly the action
    tokens a full-forward greedy decode picks, and their values equal ActionTokenizer.decode."""
    import torch

    from _reference_decode import reference_decode
    from conftest import make_samples

    vla = tiny_vla.eval()
    s = make_samples(1, seed=5)[0]
    pv, ids, st = vla.model_inputs(s.images, s.instruction, s.state, vla.processor.tokenizer.encode(" ACTION:"))
    _, act = reference_decode(vla, pv, ids, st)
    act_ids = torch.tensor([act])
    tok = vla.processor.tokenizer
    w, b = action_head_rows(vla.lm.get_output_embeddings().weight.detach(), tok.first_action_id, tok.n_bins)
    values, low, high = action_value_table(vla.action_tokenizer)
    hidden, cache = vla.prefill(pv, ids, st)
    rows = []
    for t in range(act_ids.shape[1]):  # teacher-force generate's tokens, collect each step's hidden state
        rows.append(hidden)
        hidden, cache = vla.step(act_ids[:, t], cache)
    h = torch.cat(rows)
    for name in ("reference", "numpy", "onnx"):
        bins, actions = run_implementation(name, h.numpy(), w.numpy(), action_dims(len(rows), D), values, low, high)
        np.testing.assert_array_equal(bins + tok.first_action_id, act_ids[0].numpy(), err_msg=name)
        np.testing.assert_allclose(actions, vla.action_tokenizer.decode(act_ids[0].numpy()).reshape(-1),
                                   rtol=1e-5, atol=1e-6, err_msg=name)


def test_bad_inputs_raise_one_line_errors():
    c = CASES["random_n7_h96"]
    with pytest.raises(EdgeVLAError, match="expected \\(n_bins, 96\\)"):
        decode_actions_numpy(c["hidden"], c["weight"][:, :50], c["dim"], c["values"], c["low"], c["high"])
    with pytest.raises(EdgeVLAError, match="outside \\[0, 7\\)"):
        decode_actions_numpy(c["hidden"], c["weight"], c["dim"] + 5, c["values"], c["low"], c["high"])
    with pytest.raises(EdgeVLAError, match="dim has shape"):
        decode_actions_numpy(c["hidden"], c["weight"], c["dim"][:3], c["values"], c["low"], c["high"])
    with pytest.raises(EdgeVLAError, match="value table"):
        run_implementation("reference", c["hidden"], c["weight"], c["dim"], c["values"][:10], c["low"], c["high"])
    with pytest.raises(EdgeVLAError, match="did you mean `triton`"):
        run_implementation("tritn", **c)
    with pytest.raises(EdgeVLAError, match="outside the LM head"):
        action_head_rows(np.zeros((300, 4)), 100, 256)
    from edge_vla.kernels.onnx_graph import build_action_head_graph

    with pytest.raises(EdgeVLAError, match="low > high"):
        build_action_head_graph(c["weight"], c["values"], c["high"], c["low"])


def test_available_implementations_say_why_not():
    status = available_implementations()
    assert set(status) == set(IMPLEMENTATIONS)
    assert status["numpy"] is None and status["reference"] is None and status["onnx"] is None
    import torch

    if not torch.cuda.is_available():
        assert "GPU" in status["cuda"]
        from edge_vla.errors import EdgeVLAError as E

        with pytest.raises(E, match="needs CUDA tensors"):
            from edge_vla.kernels.cuda_loader import decode_actions_cuda

            c = CASES["random_n1"]
            decode_actions_cuda(*(torch.as_tensor(c[k]) for k in ("hidden", "weight", "dim", "values", "low", "high")))


# --- the ONNX graph ----------------------------------------------------------------------------------
def test_standalone_graph_is_standard_onnx_with_dynamic_rows():
    import onnx

    from edge_vla.kernels.onnx_graph import OnnxActionHead, build_action_head_graph

    c = CASES["random_bias"]
    model = build_action_head_graph(c["weight"], c["values"], c["low"], c["high"], c["bias"])
    onnx.checker.check_model(model, full_check=True)
    assert {n.domain for n in model.graph.node} <= {""}
    argmax = next(n for n in model.graph.node if n.op_type == "ArgMax")
    assert onnx.helper.get_attribute_value(next(a for a in argmax.attribute if a.name == "select_last_index")) == 0
    assert [i.name for i in model.graph.input] == ["hidden", "dim"]
    assert [o.name for o in model.graph.output] == ["bins", "actions"]
    head = OnnxActionHead(c["weight"], c["values"], c["low"], c["high"], c["bias"])
    for n in (1, 7, 50):  # one session, several row counts
        h = np.random.default_rng(n).normal(size=(n, c["hidden"].shape[1])).astype(np.float32)
        d = action_dims(n, D)
        _assert_match(f"rows={n}", head(h, d), decode_actions_numpy(h, c["weight"], d, c["values"], c["low"],
                                                                    c["high"], c["bias"]))


def _toy_decoder(rng, h_in=12, hidden=24, vocab=2000):
    """A small decoder-shaped graph: x -> MatMul -> Tanh = hidden (B, H); hidden -> MatMul = logits (B, V)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w1 = rng.normal(size=(h_in, hidden)).astype(np.float32)
    head = rng.normal(size=(vocab, hidden)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["pre"]), helper.make_node("Tanh", ["pre"], ["hidden"]),
         helper.make_node("MatMul", ["hidden", "head_t"], ["logits"], name="full_head")],
        "toy_decoder",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", h_in])],
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", hidden]),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", vocab])],
        initializer=[numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(np.ascontiguousarray(head.T), "head_t")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model, w1, head


def test_append_action_head_merges_into_a_decoder_and_drops_the_full_head():
    import onnxruntime as ort

    from edge_vla.kernels.onnx_graph import append_action_head

    rng = np.random.default_rng(3)
    decoder, w1, head = _toy_decoder(rng)
    first, n_bins = 300, N_BINS
    w, _ = action_head_rows(head, first, n_bins)
    values, low, high = _table(rng)
    x = rng.normal(size=(9, 12)).astype(np.float32)
    dim = action_dims(9, D)
    hidden = np.tanh(x @ w1)
    want = decode_actions_numpy(hidden, w, dim, values, low, high)

    both = append_action_head(decoder, "hidden", w, values, low, high)
    s = ort.InferenceSession(both.SerializeToString(), providers=["CPUExecutionProvider"])
    out = dict(zip([o.name for o in s.get_outputs()], s.run(None, {"x": x, "action_dim": dim})))
    _assert_match("merged", (out["action_bins"], out["actions"]), want)
    # The restricted head picks what the full head picks when restricted to the action block.
    np.testing.assert_array_equal(out["logits"][:, first:first + n_bins].argmax(1), out["action_bins"])

    direct = append_action_head(decoder, "hidden", w, values, low, high, drop_outputs=("logits",))
    assert "full_head" not in {n.name for n in direct.graph.node}
    assert "head_t" not in {i.name for i in direct.graph.initializer}
    assert direct.ByteSize() < decoder.ByteSize() // 2  # the 2000-row head is gone, 256 rows remain
    s = ort.InferenceSession(direct.SerializeToString(), providers=["CPUExecutionProvider"])
    assert [o.name for o in s.get_outputs()] == ["hidden", "action_bins", "actions"]
    _, bins, actions = s.run(None, {"x": x, "action_dim": dim})
    _assert_match("direct", (bins, actions), want)

    with pytest.raises(EdgeVLAError, match="no output 'last_hidden'"):
        append_action_head(decoder, "last_hidden", w, values, low, high)
    with pytest.raises(EdgeVLAError, match="cannot drop"):
        append_action_head(decoder, "hidden", w, values, low, high, drop_outputs=("nope",))


# --- the CUDA source -----------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("arch,mode", [("sm_87", "ptx"), ("sm_87", "cubin"), ("sm_90", "cubin")])
def test_cuda_source_compiles_with_nvcc(tmp_path, arch, mode):
    """sm_87 = Jetson Orin, sm_90 = H100: the shipped .cu compiles (no GPU needed)."""
    from edge_vla.kernels.cuda_loader import KERNEL_NAME, nvcc_compile

    out = nvcc_compile(tmp_path, arch=arch, mode=mode)
    assert out.stat().st_size > 1000
    if mode == "ptx":
        assert f".entry {KERNEL_NAME}(" in out.read_text()  # extern "C": unmangled, loadable by name


def _nvrtc():
    from edge_vla.kernels.cuda_loader import find_nvrtc

    return find_nvrtc()


@pytest.mark.skipif(_nvrtc() is None, reason="libnvrtc not found (set EDGE_VLA_NVRTC_LIBRARY to run this)")
def test_cuda_source_compiles_with_nvrtc():
    """NVRTC is what CuPy's RawModule compiles with: no headers, no host compiler."""
    from edge_vla.kernels.cuda_loader import KERNEL_NAME, nvrtc_compile

    for arch in ("compute_87", "compute_90"):
        assert f".entry {KERNEL_NAME}(" in nvrtc_compile(arch)


def test_cuda_source_ships_as_package_data():
    from edge_vla.kernels.cuda_loader import KERNEL_NAME, kernel_source

    src = kernel_source()
    assert f'extern "C" __global__ void {KERNEL_NAME}(' in src
    assert "#include" not in src  # NVRTC (CuPy) compiles it without headers


# --- GPU: compiled Triton and CUDA kernels ------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("case", sorted(CASES))
def test_compiled_triton_matches_the_reference(case):
    pytest.importorskip("triton")
    _assert_match(f"triton/{case}", run_implementation("triton", **CASES[case]), _expected(CASES[case]))


@pytest.mark.gpu
@pytest.mark.parametrize("loader", ["pycuda", "cupy"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_cuda_kernel_matches_the_reference(loader, case):
    pytest.importorskip(loader)
    import torch

    from edge_vla.kernels.cuda_loader import decode_actions_cuda

    c = CASES[case]
    t = {k: None if v is None else torch.as_tensor(v, device="cuda") for k, v in c.items()}
    bins, actions = decode_actions_cuda(**t, loader=loader)
    _assert_match(f"cuda-{loader}/{case}", (bins.cpu().numpy(), actions.cpu().numpy()), _expected(c))


@pytest.mark.gpu
def test_gpu_reference_matches_cpu_reference():
    for case, c in CASES.items():
        _assert_match(f"reference-cuda/{case}", run_implementation("reference", **c, device="cuda"), _expected(c))


def test_numpy_and_onnx_paths_never_import_torch():
    """The ONNX runtime path decodes actions without torch (edge_vla.runtime's contract)."""
    code = ("import sys, numpy as np\n"
            "from edge_vla.kernels import run_implementation, available_implementations, action_dims\n"
            "rng = np.random.default_rng(0)\n"
            "h, w, v = rng.normal(size=(7, 16)), rng.normal(size=(256, 16)), rng.normal(size=(256, 7))\n"
            "a = run_implementation('numpy', h, w, action_dims(7, 7), v, -np.ones(7), np.ones(7))\n"
            "b = run_implementation('onnx', h, w, action_dims(7, 7), v, -np.ones(7), np.ones(7))\n"
            "assert (a[0] == b[0]).all()\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_split_lm_head_shares_one_body_between_modes():
    import onnxruntime as ort

    from edge_vla.kernels.onnx_graph import split_lm_head

    rng = np.random.default_rng(4)
    decoder, w1, head_w = _toy_decoder(rng)
    body, head = split_lm_head(decoder, head_w)
    assert [o.name for o in body.graph.output] == ["hidden"]
    assert "head_t" not in {i.name for i in body.graph.initializer}
    assert "full_head" not in {n.name for n in body.graph.node}
    x = rng.normal(size=(5, 12)).astype(np.float32)
    (hidden,) = ort.InferenceSession(body.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    (logits,) = ort.InferenceSession(head.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"hidden": hidden})
    np.testing.assert_allclose(logits, np.tanh(x @ w1) @ head_w.T, rtol=1e-4, atol=1e-4)
    with pytest.raises(EdgeVLAError, match="no output 'lgts'"):
        split_lm_head(decoder, head_w, logits_output_name="lgts")
    with pytest.raises(EdgeVLAError, match="LM-head weight has shape"):
        split_lm_head(decoder, head_w[:, :5])
