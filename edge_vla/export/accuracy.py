"""Parity (exported graphs vs PyTorch) and accuracy (quantized bundle vs its fp32 source).

Both run real observations through two backends/policies and compare what they decode.
Parity feeds both backends the same (reference) tokens so every step's logits are compared;
accuracy lets each policy decode on its own, the way a robot would run it.
"""

from __future__ import annotations

import numpy as np

from edge_vla.errors import EdgeVLAError


def _full_logits(backend, hidden, logits):
    """The full-vocabulary logits: returned by the step, or from the backend's separate LM head."""
    return logits if logits is not None else backend.lm_logits(hidden)


def parity(ref, test, observations, n_tokens: int = 16, atol: float = 1e-3, rtol: float = 1e-3,
           min_agreement: float = 1.0) -> dict:
    """Compare backends `test` against `ref` (teacher-forced greedy decode of `n_tokens` tokens).

    Every step compares the full logits (decoder body + LM head) and, when `test` has a fused
    restricted action head, that head's action logits and greedy bin against the reference's
    action-token logits: both heads a bundle decodes with are checked.
    Returns {max_logit_diff, logit_scale, token_agreement, n_tokens, passed}
    (+ max_action_logit_diff, action_bin_agreement with a restricted head).
    """
    from edge_vla.runtime.policy import Policy

    proc = Policy(ref, mode="direct")  # only for input checks and processing
    lo, n_bins = proc.tokenizer.first_action_id, proc.tokenizer.n_bins
    restricted = bool(getattr(test, "has_fused_action_head", False))
    worst, scale, agree, total = 0.0, 0.0, 0, 0
    act_worst, act_agree = 0.0, 0
    for obs in observations:
        pv, state, prompt = proc._inputs(obs)
        pa, pb = ref.encode_prefix(pv, state), test.encode_prefix(pv, state)
        (ha, la, ca), (hb, lb, cb) = ref.prefill(pa, prompt), test.prefill(pb, prompt)
        for i in range(n_tokens + 1):
            la = np.asarray(_full_logits(ref, ha, la), np.float64)
            lb = np.asarray(_full_logits(test, hb, lb), np.float64)
            worst = max(worst, float(np.abs(la - lb).max()))
            scale = max(scale, float(np.abs(la).max()))
            agree += int(la.argmax() == lb.argmax())
            if restricted:
                ra = la[lo:lo + n_bins]
                rb = np.asarray(test.action_logits(hb, None), np.float64)
                act_worst = max(act_worst, float(np.abs(ra - rb).max()))
                act_agree += int(ra.argmax() == rb.argmax())
            total += 1
            if i == n_tokens:
                break
            nxt = int(la.argmax())
            (ha, la, ca), (hb, lb, cb) = ref.step([nxt], ca), test.step([nxt], cb)
    agreement = agree / max(total, 1)
    passed = worst <= atol + rtol * scale and agreement >= min_agreement
    out = {"max_logit_diff": worst, "logit_scale": scale, "token_agreement": agreement,
           "n_tokens": total, "n_observations": len(observations)}
    if restricted:
        out["max_action_logit_diff"] = act_worst
        out["action_bin_agreement"] = act_agree / max(total, 1)
        passed = passed and act_worst <= atol + rtol * scale and out["action_bin_agreement"] >= min_agreement
    return {**out, "passed": bool(passed)}


def teacher_forced(test_policy, obs, ref_result) -> tuple[list[int], list[int]]:
    """What `test_policy` predicts at every position of `ref_result`'s decode, fed the reference's tokens.

    Returns (reasoning-token predictions, action-token predictions), aligned with the reference's
    free token ids after the forced reasoning prefix, and with its action token ids. Unlike free
    decoding, one flipped token cannot change what follows: this is the per-token effect of
    quantization, the agreement a speculative decoder would see. The policy's own decoding runs,
    with the reference's tokens fed back.
    """
    pol, be = test_policy, test_policy.backend
    free, actions = list(ref_result.info["free_token_ids"]), list(ref_result.info["action_token_ids"])
    pv, state, prompt = pol._inputs(obs)
    prefix = be.encode_prefix(pv, state)
    timings: dict = {}
    if ref_result.reasoning_text is None:  # it acted directly
        return [], pol._decode_direct(prefix, prompt, timings, feed=actions)["action_ids"]
    # It reasoned (full mode, or adaptive when uncertain). Both policies force the reasoning prefix: not scored.
    forced = list(pol.reasoning_prefix_ids)
    hidden, logits, cache = be.prefill(prefix, prompt + forced)
    free_pred: list[int] = []
    for tok in free[len(forced):]:
        free_pred.append(pol._next_free_token(pol._full_logits(hidden, logits, timings), len(forced) + len(free_pred)))
        hidden, logits, cache = be.step([tok], cache)
    if ref_result.info.get("forced_action_prefix"):
        hidden, logits, cache = be.step(list(pol.forced_action_ids), cache)
    return free_pred, pol._action_tokens(hidden, logits, cache, timings, feed=actions)[0]


def action_similarity(ref_actions, test_actions) -> dict:
    """How users compare a deployed VLA with its reference: the mean cosine similarity of each
    observation's action vector (the whole chunk, flattened) and the largest absolute error, in
    env units. Two zero vectors count as identical."""
    cos, worst = [], 0.0
    for a, b in zip(ref_actions, test_actions):
        a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
        na, nb = np.linalg.norm(a), np.linalg.norm(b)
        cos.append(1.0 if na == nb == 0 else float(a @ b / (na * nb)) if na and nb else 0.0)
        worst = max(worst, float(np.abs(a - b).max()) if a.size else 0.0)
    return {"action_cosine": float(np.mean(cos)) if cos else 1.0, "action_max_abs_err": worst}


def reference_results(ref_policy, observations, modes=("direct",)) -> dict:
    """{mode: [ActionResult]}: the reference policy's decodes, computed once when several bundles are
    scored against the same reference (`accuracy_report(..., reference=)`)."""
    out = {}
    for mode in modes:
        ref_policy.mode = mode
        out[mode] = [ref_policy.act(obs) for obs in observations]
    return out


def accuracy_report(ref_policy, test_policy, observations, modes=("direct",), reference: dict | None = None) -> dict:
    """Action-token agreement (free-running and teacher-forced), action L1 (env units), per-dim error;
    reasoning-token agreement in full mode. `reference`: `reference_results` of `ref_policy` on the
    same observations (else decoded here)."""
    report: dict = {"n_observations": len(observations)}
    for mode in modes:
        ref_policy.mode = test_policy.mode = mode
        act_eq = act_n = reason_eq = reason_n = tf_eq = tf_reason_eq = tf_reason_n = 0
        errs, ref_actions, test_actions, per_obs = [], [], [], []
        for i, obs in enumerate(observations):
            a = reference[mode][i] if reference else ref_policy.act(obs)
            b = test_policy.act(obs)
            ref_actions.append(a.action)
            test_actions.append(b.action)
            ia, ib = np.array(a.info["action_token_ids"]), np.array(b.info["action_token_ids"])
            act_eq += int((ia == ib).sum())
            act_n += ia.size
            per_obs.append(float((ia == ib).mean()) if ia.size else 1.0)
            free_pred, act_pred = teacher_forced(test_policy, obs, a)
            tf_eq += int((np.array(act_pred) == ia).sum())
            decoded = a.info["free_token_ids"][len(test_policy.reasoning_prefix_ids):] if free_pred else []
            tf_reason_eq += sum(int(x == y) for x, y in zip(free_pred, decoded))
            tf_reason_n += len(free_pred)
            errs.append(np.abs(np.asarray(a.action, np.float64) - np.asarray(b.action, np.float64)).reshape(-1, a.action.shape[-1]))
            fa, fb = a.info["free_token_ids"], b.info["free_token_ids"]
            if mode == "full":
                n = max(len(fa), len(fb))
                reason_eq += sum(int(x == y) for x, y in zip(fa, fb))
                reason_n += n
        e = np.concatenate(errs) if errs else np.zeros((0, 1))
        r = {"action_token_agreement": act_eq / max(act_n, 1), "action_token_agreement_tf": tf_eq / max(act_n, 1),
             "action_l1": float(e.mean()) if e.size else 0.0,
             "per_dim_l1": e.mean(0).tolist() if e.size else [], "per_dim_max": e.max(0).tolist() if e.size else [],
             "n_action_tokens": act_n, **action_similarity(ref_actions, test_actions),
             # how far the free-running figure may move with another draw of observations
             "action_token_agreement_se": float(np.std(per_obs, ddof=1) / np.sqrt(len(per_obs))) if len(per_obs) > 1 else 0.0}
        if mode == "full":
            r["reasoning_token_agreement"] = reason_eq / reason_n if reason_n else 1.0
            r["reasoning_token_agreement_tf"] = tf_reason_eq / tf_reason_n if tf_reason_n else 1.0
        report[mode] = r
    return report


def format_report(report: dict) -> str:
    lines = []
    for mode, r in report.items():
        if not isinstance(r, dict):
            continue
        tf = r.get("action_token_agreement_tf")
        line = (f"  {mode:8s} action-token agreement {100 * r['action_token_agreement']:.2f}% free-running"
                + (f", {100 * tf:.2f}% teacher-forced" if tf is not None else "")
                + f"  action L1 {r['action_l1']:.5f} (env units)  per-dim L1 "
                + " ".join(f"{x:.4f}" for x in r["per_dim_l1"]))
        if "action_cosine" in r:
            line += f"  action cosine {r['action_cosine']:.5f}, max error {r['action_max_abs_err']:.4f}"
        if "reasoning_token_agreement" in r:
            line += f"  reasoning-token agreement {100 * r['reasoning_token_agreement']:.2f}%"
            if "reasoning_token_agreement_tf" in r:
                line += f" ({100 * r['reasoning_token_agreement_tf']:.2f}% teacher-forced)"
        lines.append(line)
    return "\n".join(lines)


def require(report_value: float, floor: float | None, what: str) -> None:
    if floor is not None and report_value < floor:
        raise EdgeVLAError(f"{what} {100 * report_value:.2f}% is below the required {100 * floor:.2f}%",
                           "export at a higher precision, or calibrate on more representative data")
