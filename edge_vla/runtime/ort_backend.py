"""ONNX Runtime backend: runs a bundle with onnxruntime + numpy + tokenizers only (no torch).

The KV cache is a list of numpy arrays fed back as `past_*` inputs; prefill and decode use the
same decoder graph (past length 0 at prefill). The decoder graph is the body only (hidden state
out): `prefill`/`step` return logits=None and the Policy asks for what it needs from the hidden
state, the full-vocabulary logits (`lm_logits`, lm_head.onnx: free tokens) or the action token
(`action_bin`/`action_logits`, action_head.onnx: 256 rows). `head="full"` makes action tokens go
through the full head too (the comparison `edge-vla bench --compare-head` measures).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_vla.errors import EdgeVLAError, MissingDependencyError
from edge_vla.artifacts.bundle import HIDDEN_ALL
from edge_vla.runtime.policy import bind_bundle


class OrtBackend:
    name = "onnxruntime"

    HEADS = ("restricted", "full")

    def __init__(self, bundle, threads: int | None = 1, providers: list[str] | None = None, head: str = "restricted"):
        try:
            import onnxruntime as ort
        except ImportError:
            raise MissingDependencyError("onnxruntime", "the ONNX Runtime backend") from None

        if head not in self.HEADS:
            from edge_vla.config import unknown_name_error

            raise unknown_name_error("action head", head, list(self.HEADS))
        self.head = head
        bind_bundle(self, bundle)
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = int(threads)
            so.inter_op_num_threads = 1
        so.log_severity_level = 3
        available = ort.get_available_providers()
        if providers is None:
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        missing = [p for p in providers if p not in available]
        if missing:
            raise EdgeVLAError(f"onnxruntime here lacks provider(s) {missing}", f"available: {available}")
        self.sessions = {}
        for role in ("prefix", "embed", "decoder", "lm_head", "action_head"):
            try:
                self.sessions[role] = ort.InferenceSession(str(bundle.graph_path(role)), so, providers=providers)
            except Exception as e:
                raise EdgeVLAError(f"onnxruntime cannot load the {role} graph of {bundle.path} "
                                   f"({type(e).__name__}: {str(e).splitlines()[0][:200]})", "re-export the bundle") from None
        dec = bundle.graphs["decoder"]
        self._past_names = dec["inputs"][1:]
        outs = [o.name for o in self.sessions["decoder"].get_outputs()]
        self._present_names = [o for o in outs if o.startswith("present")]
        if self.parallel_actions and HIDDEN_ALL not in outs:
            raise EdgeVLAError(f"bundle {bundle.path} decodes actions in parallel but its decoder graph has no "
                               f"`{HIDDEN_ALL}` output", "re-export the checkpoint with this edge-vla")
        self._kv_shape = (dec["n_kv_heads"], dec["head_dim"])
        self._prefix_inputs = bundle.graphs["prefix"]["inputs"]
        self._kv_dtype = np.float16 if "float16" in self.sessions["decoder"].get_inputs()[1].type else np.float32
        self._embed_dtype = np.float16 if "float16" in self.sessions["decoder"].get_inputs()[0].type else np.float32
        self._lm_dtype = np.float16 if "float16" in self.sessions["lm_head"].get_inputs()[0].type else np.float32

    @classmethod
    def load(cls, path: str | Path, **opts):
        from edge_vla.artifacts.bundle import load_bundle

        return cls(load_bundle(path), **opts)

    def encode_prefix(self, pixel_values, state):
        feeds = {"pixel_values": np.ascontiguousarray(pixel_values, dtype=np.float32)}
        if "state" in self._prefix_inputs:
            if state is None:
                raise EdgeVLAError("this bundle reads the proprio state but none was given", "pass `state`")
            feeds["state"] = np.ascontiguousarray(state, dtype=np.float32)
        return self.sessions["prefix"].run(None, feeds)[0]

    def _embed(self, ids):
        return self.sessions["embed"].run(None, {"input_ids": np.asarray([list(ids)], dtype=np.int64)})[0]

    def _run(self, embeds, cache, n_last=None):
        feeds = {"inputs_embeds": embeds.astype(self._embed_dtype, copy=False)}
        feeds.update(zip(self._past_names, cache))
        first = "hidden" if n_last is None else HIDDEN_ALL
        hidden, *present = self.sessions["decoder"].run([first, *self._present_names], feeds)
        hidden = hidden[0] if n_last is None else hidden[0, -n_last:]
        return hidden.astype(np.float32), None, present

    def prefill(self, prefix, input_ids, n_last: int | None = None):
        """(hidden (H,), None, cache) of the last position; with `n_last` (a parallel-decoding bundle),
        the hidden states of the last n_last positions (n_last, H)."""
        embeds = np.concatenate([prefix.astype(np.float32), self._embed(input_ids).astype(np.float32)], axis=1)
        empty = np.zeros((1, *self._kv_shape[:1], 0, self._kv_shape[1]), dtype=self._kv_dtype)
        return self._run(embeds, [empty] * len(self._past_names), n_last)

    def step(self, token_ids, cache, n_last: int | None = None):
        return self._run(self._embed(token_ids), cache, n_last)

    def lm_logits(self, hidden) -> np.ndarray:
        """(V,) full-vocabulary logits of one hidden state (lm_head.onnx)."""
        feed = {"hidden": np.asarray(hidden, np.float32)[None].astype(self._lm_dtype, copy=False)}
        return self.sessions["lm_head"].run(None, feed)[0][0].astype(np.float32)

    def action_logits(self, hidden, logits):
        """(n_bins,) logits of the action tokens: from the restricted head, or sliced from the full one."""
        if logits is not None:
            return np.asarray(logits)[self._lo:self._hi]
        if self.head == "full":
            return self.lm_logits(hidden)[self._lo:self._hi]
        return self.sessions["action_head"].run(["action_logits"], self._action_feed(hidden, 0))[0][0]

    @property
    def has_fused_action_head(self) -> bool:
        return self.head == "restricted"

    def _action_feed(self, hidden, dim: int) -> dict:
        return {"hidden": np.asarray(hidden, np.float32)[None], "dim": np.asarray([dim], np.int64)}

    def action_bin(self, hidden, dim: int) -> int:
        """Bin of one action token from the fused head graph (reads only the 256 action rows)."""
        return int(self.sessions["action_head"].run(["bins"], self._action_feed(hidden, dim))[0][0])

    def action_bins(self, hidden, dims) -> np.ndarray:
        """Bins of n action tokens (hidden (n, H), dims (n,)) in one run of the fused head graph."""
        feed = {"hidden": np.asarray(hidden, np.float32), "dim": np.asarray(dims, np.int64)}
        return self.sessions["action_head"].run(["bins"], feed)[0].astype(np.int64)
