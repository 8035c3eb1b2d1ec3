"""`Policy`: one observation in, one action out, the same for every backend.

A backend knows how to run the network; the Policy knows how to decode (numpy only):

    direct    prompt + inference prefix (" ACTION:") -> only action tokens
    full      prompt -> free tokens (the reasoning) until the first action token -> action tokens
    adaptive  direct first; when the action tokens are uncertain (mean entropy above
              `entropy_threshold`, or mean top-1/top-2 margin below `margin_threshold`),
              reason first (full) and use that action instead

The backend interface (see `Backend`) is deliberately small, so TensorRT or any other engine is
one class registered in `BACKENDS`.

This module imports only numpy and edge_vla's numpy-only modules: the ONNX Runtime path never
imports torch.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edge_vla.errors import EdgeVLAError
from edge_vla.tokens.action import ActionTokenizer, entropy_and_margin
from edge_vla.tokens.reasoning import Reasoning
from edge_vla.tokens.sequence import ACTION_PREFIX, WRITES_REASONING, placeholder_id, reasoning_prefix_ids

MODES = ("full", "direct", "adaptive")
DEFAULT_MAX_FREE_TOKENS = 512


@dataclass
class ActionResult:
    action: np.ndarray  # (D,) or (K, D) in env units
    reasoning_text: str | None = None
    reasoning: Reasoning | None = None  # reasoning_text parsed into ECoT's fields (None: no tag in it)
    # ms: vision, prefill, decode_tokens [..], action_decode, total; body [..] (each decoder step) and
    # head [..] (each head evaluation: full logits for free tokens, the action head for action tokens)
    timings: dict[str, Any] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)  # prompt, reasoning, action counts
    info: dict[str, Any] = field(default_factory=dict)


class Backend(Protocol):
    """What a Policy needs from an engine. Arrays are numpy; batch size is 1.

    name                       registry name ("torch", "onnxruntime", ...)
    processor                  edge_vla.model.processor.VLAProcessor (images, state, prompt ids)
    action_stats               edge_vla.tokens.action.ActionStats
    recipe                     dict from recipe.json ({} when there is none)
    n_action_tokens            action tokens per call (action_chunk * action_dim)
    encode_prefix(pixel_values (1, C, 3, S, S) float32, state (1, 8) float32 | None) -> prefix handle
    prefill(prefix, input_ids list[int]) -> (hidden (H,), logits (V,) | None, cache)
    step(token_ids list[int], cache) -> (hidden (H,), logits (V,) | None, cache)  # appends tokens to the cache
    action_logits(hidden (H,), logits (V,) | None) -> (n_bins,) logits of the action tokens only
    optional:
    lm_logits(hidden (H,)) -> (V,)   required when prefill/step return logits=None: a backend whose
                                     decoder graph has no LM head (bundles) computes the full logits
                                     only when the Policy needs them (free tokens)
    has_fused_action_head, action_bin(hidden (H,), dim int) -> bin   the restricted fused head
    action_bins(hidden (n, H), dims (n,)) -> bins (n,)               the same for a whole chunk (required
                                     with the fused head for parallel decoding)
    parallel_actions, and prefill/step(..., n_last=n) -> (hidden (n, H), logits (n, V) | None, cache)
                                     a model trained with placeholder action inputs: the whole chunk
                                     from one decoder pass
    """

    name: str


# name -> "module:Class"; backends import lazily so that loading one never imports another's stack.
BACKENDS: dict[str, str] = {
    "torch": "edge_vla.runtime.torch_backend:TorchBackend",
    "onnxruntime": "edge_vla.runtime.ort_backend:OrtBackend",
    "tensorrt": "edge_vla.runtime.tensorrt_backend:TensorRTBackend",
}


def backend_class(name: str):
    from edge_vla.config import unknown_name_error

    if name not in BACKENDS:
        raise unknown_name_error("backend", name, sorted(BACKENDS))
    module, attr = BACKENDS[name].split(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("edge_vla."):
            raise EdgeVLAError(f"backend `{name}` is not available in this edge-vla build ({e.name} missing)") from None
        raise


def bind_bundle(backend, bundle) -> None:
    """What every bundle-backed backend decodes with: the processor, action statistics, recipe and
    the action-token id range. One place, so ORT and TensorRT cannot drift apart."""
    from edge_vla.model.processor import VLAProcessor

    backend.bundle = bundle
    backend.processor = VLAProcessor(bundle.config, bundle.tokenizer())
    backend.action_stats = bundle.action_stats
    backend.recipe = bundle.recipe
    backend.n_action_tokens = bundle.config.n_action_tokens
    backend.parallel_actions = bool(bundle.config.parallel_actions)
    tok = backend.processor.tokenizer
    backend._lo, backend._hi = tok.first_action_id, tok.first_action_id + tok.n_bins


def _require_finite(x, what: str) -> None:
    if not np.isfinite(x).all():
        raise EdgeVLAError(f"the model produced NaN/Inf {what}",
                           "the weights or the quantized graph are broken; re-export without quantization to compare")


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3


class Policy:
    def __init__(self, backend, mode: str | None = None, max_free_tokens: int | None = None,
                 entropy_threshold: float = 1.0, margin_threshold: float | None = None,
                 inference_prefix: str | None = None, min_free_tokens: int = 0, force_action_prefix: bool = True,
                 reasoning_prefix: str | None = None):
        self.backend = backend
        recipe = dict(getattr(backend, "recipe", None) or {})
        self.recipe = recipe
        self.mode = mode or recipe.get("decode_mode") or "direct"
        if self.mode not in MODES:
            raise EdgeVLAError(f"unknown decode mode `{self.mode}`", f"use one of {list(MODES)}")
        # Checkpoints written before recipes recorded a reasoning budget for direct-mode recipes
        # (dropout: max_free_tokens 0) still carry it in their options.
        self.max_free_tokens = int(max_free_tokens or recipe.get("max_free_tokens")
                                   or (recipe.get("options") or {}).get("max_reasoning_tokens") or DEFAULT_MAX_FREE_TOKENS)
        self.min_free_tokens = int(min_free_tokens)
        self.entropy_threshold = entropy_threshold
        self.margin_threshold = margin_threshold
        self.processor = backend.processor
        tok = self.processor.tokenizer
        self.tokenizer = tok
        self.action_tokenizer = ActionTokenizer(backend.action_stats, tok.first_action_id, tok.n_bins)
        self.n_action_tokens = int(backend.n_action_tokens)
        # direct mode forces the recipe's inference prefix (thinking recipes put their filler here);
        # recipe.json's exact ids win over re-encoding its text. A full-mode recipe records an empty
        # prefix: its direct (or adaptive) decoding still needs " ACTION:".
        if inference_prefix is not None:
            ids = tok.encode(inference_prefix) if inference_prefix else []
        else:
            ids = list(recipe.get("inference_prefix_ids") or []) or (
                tok.encode(recipe["inference_prefix"]) if recipe.get("inference_prefix") else [])
        self.inference_prefix_ids = ids if (ids or inference_prefix is not None) else tok.encode(ACTION_PREFIX)
        # full mode: when the reasoning ends (budget or eos) before an action token, force " ACTION:".
        self.forced_action_ids = tok.encode(ACTION_PREFIX) if force_action_prefix else []
        # full mode starts the reasoning for a model that learned to write it (a dropout model left
        # free may take the short path); recipe.json from before the field: by recipe name.
        if reasoning_prefix is not None:
            self.reasoning_prefix_ids = tok.encode(reasoning_prefix) if reasoning_prefix else []
        elif "reasoning_prefix_ids" in recipe:
            self.reasoning_prefix_ids = list(recipe["reasoning_prefix_ids"])
        else:
            self.reasoning_prefix_ids = reasoning_prefix_ids(tok) if recipe.get("name") in WRITES_REASONING else []
        # Parallel action decoding (VLAConfig.parallel_actions): placeholders in, the whole chunk out.
        self.parallel = bool(getattr(backend, "parallel_actions", False))
        self.placeholder_id = placeholder_id(tok)
        self.calls = 0

    def reset(self) -> None:
        """Start a new episode. Decoding is stateless between calls (no history is kept)."""
        self.calls = 0

    # --- one call --------------------------------------------------------------------------------
    def act(self, obs: dict) -> ActionResult:
        t_start = time.perf_counter()
        pv, state, prompt = self._inputs(obs)
        t0 = time.perf_counter()
        prefix = self.backend.encode_prefix(pv, state)
        timings: dict[str, Any] = {"vision": _ms(t0)}
        info: dict[str, Any] = {"mode": self.mode, "backend": self.backend.name}
        if self.mode == "full":
            res = self._decode_full(prefix, prompt, timings)
        else:
            res = self._decode_direct(prefix, prompt, timings)
            if self.mode == "adaptive":
                ent, margin = entropy_and_margin(res["action_logits"])
                uncertain = ent > self.entropy_threshold or (
                    self.margin_threshold is not None and margin < self.margin_threshold)
                info["adaptive"] = {"entropy": ent, "margin": margin, "reasoned": bool(uncertain)}
                if uncertain:
                    direct_t = {k: list(v) if isinstance(v, list) else v for k, v in timings.items()}
                    res = self._decode_full(prefix, prompt, timings)
                    info["adaptive"]["direct_timings"] = direct_t
        t0 = time.perf_counter()
        action = self.action_tokenizer.decode(np.asarray(res["action_ids"]))
        timings["action_decode"] = timings.pop("_action_tokens_ms") + _ms(t0)
        self._check_action(action, info)
        timings["total"] = _ms(t_start)
        self.calls += 1
        tokens = {"prompt": len(prompt), "reasoning": len(res["free_ids"]), "action": len(res["action_ids"])}
        text = res.get("text")
        parsed = None if text is None else Reasoning.from_generated(text, self.tokenizer.decode(prompt[-4:]))
        return ActionResult(action=action.astype(np.float32), reasoning_text=text, reasoning=parsed, timings=timings,
                            tokens=tokens,
                            info=info | {"action_token_ids": list(map(int, res["action_ids"])),
                                         "free_token_ids": list(map(int, res["free_ids"])),
                                         "forced_action_prefix": bool(res.get("forced_action_prefix"))})

    def _inputs(self, obs):
        if not isinstance(obs, dict):
            raise EdgeVLAError(f"observation must be a dict, got {type(obs).__name__}",
                               'pass {"images": {camera: uint8 HxWx3}, "state": (8,), "instruction": str}')
        for key in ("images", "instruction"):
            if key not in obs:
                raise EdgeVLAError(f"observation lacks `{key}`", 'pass {"images": ..., "state": ..., "instruction": ...}')
        if not isinstance(obs["instruction"], str) or not obs["instruction"].strip():
            raise EdgeVLAError("observation `instruction` must be a non-empty string")
        pv = self.processor.images(obs["images"])[None]
        use_state = self.processor.config.use_proprio
        state = self.processor.state(obs.get("state"))[None] if use_state else None
        return pv, state, self.processor.prompt_ids(obs["instruction"])

    # --- decoding --------------------------------------------------------------------------------
    def _action_tokens(self, hidden, logits, cache, timings, feed: list[int] | None = None) -> tuple[list[int], np.ndarray]:
        """Greedy restricted decode of n_action_tokens; the first comes from (hidden, logits).
        `feed`: the tokens fed back after each action token instead of the decoded ones (teacher
        forcing; a parallel chunk feeds nothing back)."""
        t0 = time.perf_counter()
        lo = self.tokenizer.first_action_id
        # The fused action head (bins straight from the hidden state) serves every mode except
        # adaptive, which needs the action logits for its entropy/margin.
        fused = getattr(self.backend, "has_fused_action_head", False) and self.mode != "adaptive"
        dim = self.action_tokenizer.dim
        body, head = timings.setdefault("body", []), timings.setdefault("head", [])
        ids, rows = [], []
        if self.parallel:
            return self._parallel_action_tokens(hidden, logits, cache, timings, fused, t0)
        while True:
            th = time.perf_counter()
            if fused:
                _require_finite(hidden, "hidden states")
                ids.append(lo + self.backend.action_bin(hidden, len(ids) % dim))
            else:
                a = np.asarray(self.backend.action_logits(hidden, logits), dtype=np.float32)
                _require_finite(a, "action logits")
                rows.append(a)
                ids.append(lo + int(a.argmax()))
            head.append(_ms(th))
            if len(ids) == self.n_action_tokens:
                break
            tb = time.perf_counter()
            hidden, logits, cache = self.backend.step([ids[-1] if feed is None else feed[len(ids) - 1]], cache)
            body.append(_ms(tb))
        timings["_action_tokens_ms"] = _ms(t0)
        return ids, (np.stack(rows) if rows else None)

    def _parallel_action_tokens(self, hidden, logits, cache, timings, fused, t0):
        """Every action token from one pass: `hidden` (, `logits`) predict the first one, or, as
        returned by a prefill that already held the placeholders, all of them (n, H)."""
        n, dim, lo = self.n_action_tokens, self.action_tokenizer.dim, self.tokenizer.first_action_id
        hidden = np.asarray(hidden)
        if hidden.ndim == 1:
            tb = time.perf_counter()
            rest, rest_logits, _ = self.backend.step([self.placeholder_id] * (n - 1), cache, n_last=n - 1) \
                if n > 1 else (np.zeros((0, hidden.shape[0]), np.float32), None, cache)
            timings["body"].append(_ms(tb))
            hidden = np.concatenate([hidden[None], np.asarray(rest).reshape(-1, hidden.shape[0])])
            # Backends without an LM head in the decoder return logits=None: the action head reads hidden.
            logits = [logits] + (list(np.asarray(rest_logits).reshape(n - 1, -1)) if rest_logits is not None
                                 else [None] * (n - 1))
        _require_finite(hidden, "hidden states")
        th = time.perf_counter()
        rows = []
        if fused:  # the whole chunk in one run of the fused head
            ids = [lo + int(b) for b in self.backend.action_bins(hidden, np.arange(n) % dim)]
        else:
            for i in range(n):
                rows.append(np.asarray(self.backend.action_logits(hidden[i], None if logits is None else logits[i]),
                                       np.float32))
            ids = [lo + int(a.argmax()) for a in rows]
        timings["head"].append(_ms(th))
        timings["_action_tokens_ms"] = _ms(t0)
        return ids, (np.stack(rows) if rows else None)

    def _next_free_token(self, logits, n_free: int) -> int:
        """Greedy free (reasoning) token after `n_free` of them, forced prefix included: before
        `min_free_tokens` neither an action token nor eos may end the reasoning (HF's min_new_tokens)."""
        if n_free < self.min_free_tokens:
            tok = self.tokenizer
            logits = np.array(logits, copy=True)
            logits[tok.first_action_id:tok.first_action_id + tok.n_bins] = -np.inf
            logits[tok.eos_id] = -np.inf
        return int(np.asarray(logits).argmax())

    def _full_logits(self, hidden, logits, timings) -> np.ndarray:
        """Full-vocabulary logits (free tokens): the backend's, or its separate LM head's."""
        if logits is not None:
            return np.asarray(logits)
        t0 = time.perf_counter()
        out = np.asarray(self.backend.lm_logits(hidden))
        timings.setdefault("head", []).append(_ms(t0))
        return out

    def _decode_direct(self, prefix, prompt, timings, feed: list[int] | None = None) -> dict:
        t0 = time.perf_counter()
        if self.parallel:  # the placeholders ride along in the prefill: one decoder pass in all
            n = self.n_action_tokens
            hidden, logits, cache = self.backend.prefill(
                prefix, prompt + self.inference_prefix_ids + [self.placeholder_id] * (n - 1), n_last=n)
        else:
            hidden, logits, cache = self.backend.prefill(prefix, prompt + self.inference_prefix_ids)
        timings["prefill"] = _ms(t0)
        timings["decode_tokens"] = []
        ids, rows = self._action_tokens(hidden, logits, cache, timings, feed)
        return {"free_ids": [], "action_ids": ids, "action_logits": rows, "text": None}

    def _decode_full(self, prefix, prompt, timings) -> dict:
        """Reason freely until the model emits an action token (or eos / the budget), then act."""
        tok = self.tokenizer
        lo, hi = tok.first_action_id, tok.first_action_id + tok.n_bins
        t0 = time.perf_counter()
        hidden, logits, cache = self.backend.prefill(prefix, prompt + self.reasoning_prefix_ids)
        timings["prefill"] = _ms(t0)
        free: list[int] = list(self.reasoning_prefix_ids)
        per_token: list[float] = []
        body = timings.setdefault("body", [])
        head = timings.setdefault("head", [])
        ended_without_action = True
        for _ in range(self.max_free_tokens):
            n_head = len(head)
            logits = self._full_logits(hidden, logits, timings)
            head_ms = sum(head[n_head:])
            nxt = self._next_free_token(logits, len(free))
            if lo <= nxt < hi:
                ended_without_action = False
                break
            if nxt == tok.eos_id:
                break
            free.append(nxt)
            t0 = time.perf_counter()
            hidden, logits, cache = self.backend.step([nxt], cache)
            body.append(_ms(t0))
            per_token.append(body[-1] + head_ms)  # one decoded token: its head + the step that feeds it
        if ended_without_action and self.forced_action_ids:
            # The reasoning ran out (budget or eos) without reaching ACTION: force the action prefix.
            t0 = time.perf_counter()
            hidden, logits, cache = self.backend.step(list(self.forced_action_ids), cache)
            body.append(_ms(t0))
            per_token.append(body[-1])
        timings["decode_tokens"] = per_token
        ids, rows = self._action_tokens(hidden, logits, cache, timings)
        text = tok.decode(free)
        if text.endswith("ACTION:"):
            text = text[: -len("ACTION:")].rstrip()
        return {"free_ids": free, "action_ids": ids, "action_logits": rows, "text": text,
                "forced_action_prefix": ended_without_action}

    def _check_action(self, action: np.ndarray, info: dict) -> None:
        if not np.isfinite(action).all():
            raise EdgeVLAError("the decoded action contains NaN/Inf", "check the bundle's action statistics")
        s = self.action_tokenizer.stats
        lo, hi = np.asarray(s.min), np.asarray(s.max)
        outside = (action < lo - 1e-6) | (action > hi + 1e-6)
        if outside.any():
            info.setdefault("warnings", []).append("action outside the action statistics' [min, max] range")


def load_policy(path: str | Path, backend: str = "auto", mode: str | None = None, **opts) -> Policy:
    """A Policy from a checkpoint dir (torch backend) or a bundle dir (onnxruntime by default).

    `opts` go to the backend (e.g. threads=1, providers=[...], quantize="int8"|"nf4" for torch)
    except the Policy's own: max_free_tokens, min_free_tokens, entropy_threshold, margin_threshold,
    inference_prefix, force_action_prefix, reasoning_prefix.
    """
    from edge_vla.artifacts import open_artifact

    artifact = open_artifact(path)
    p = artifact.path
    if backend == "auto":
        backend = "onnxruntime" if artifact.is_bundle else "torch"
    policy_keys = ("max_free_tokens", "min_free_tokens", "entropy_threshold", "margin_threshold", "inference_prefix",
                   "force_action_prefix", "reasoning_prefix")
    policy_opts = {k: opts.pop(k) for k in policy_keys if k in opts}
    engine = backend_class(backend).load(p, **opts)
    return Policy(engine, mode=mode, **policy_opts)
