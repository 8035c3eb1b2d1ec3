"""PyTorch backend: runs an edge-vla checkpoint (VLA.from_pretrained) with a KV cache.

It wraps the VLA it is given, weights shared, so training validation and the distillation
teacher decode the model being trained through the same `Policy` as deployment.

`quantize="int8"|"nf4"` swaps the LM's linear layers for bitsandbytes Linear8bitLt / Linear4bit
(they run on CPU in bitsandbytes 0.50) to evaluate quantized accuracy with PyTorch; it is an
accuracy tool, not the speed path on CPU: the exported ONNX Runtime bundle is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from edge_vla import notices
from edge_vla.errors import EdgeVLAError, MissingDependencyError

TORCH_QUANT = ("int8", "nf4")


class TorchBackend:
    name = "torch"

    def __init__(self, vla, threads: int | None = None, recipe: dict | None = None):
        """`vla` is used as it is (no copy) and put in eval mode. `recipe`: the recipe.json-style
        settings the Policy decodes with (default: the model's own recipe_info)."""
        if threads:
            torch.set_num_threads(int(threads))
        self.vla = vla.eval()
        self.processor = vla.processor
        if vla.action_stats is None:
            raise EdgeVLAError("this checkpoint has no action statistics", "train it on a dataset (stats are saved with it)")
        self.action_stats = vla.action_stats
        self.recipe = dict(vla.recipe_info or {} if recipe is None else recipe)
        self.n_action_tokens = vla.config.n_action_tokens
        self.parallel_actions = bool(vla.config.parallel_actions)
        tok = vla.processor.tokenizer
        self._lo, self._hi = tok.first_action_id, tok.first_action_id + tok.n_bins
        self._embed = vla.lm.get_input_embeddings()
        self._decoder = vla.lm.get_decoder()
        self._head = vla.lm.get_output_embeddings()

    @classmethod
    def load(cls, path: str | Path, quantize: str | None = None, threads: int | None = None, device: str = "cpu"):
        from edge_vla.model.vla import VLA

        vla = VLA.from_pretrained(path, device=device)
        if quantize:
            quantize_lm_bnb(vla, quantize)
        return cls(vla, threads=threads)

    @torch.no_grad()
    def encode_prefix(self, pixel_values, state):
        pv = torch.from_numpy(np.ascontiguousarray(pixel_values)).to(self.vla.device)
        st = None if state is None else torch.from_numpy(np.ascontiguousarray(state)).to(self.vla.device)
        return self.vla.encode_prefix(pv, st)

    def _run(self, embeds, cache, n_last=None):
        out = self._decoder(inputs_embeds=embeds, cache=cache, use_cache=True)
        hidden = out.last_hidden_state[0, -1] if n_last is None else out.last_hidden_state[0, -n_last:]
        logits = self._head(hidden)
        return hidden.float().cpu().numpy(), logits.float().cpu().numpy(), out.cache

    @torch.no_grad()
    def prefill(self, prefix, input_ids, n_last: int | None = None):
        """(hidden (H,), logits (V,), cache) of the last position; with `n_last`, (n_last, H) and (n_last, V)."""
        from transformers import DynamicCache

        ids = torch.tensor([list(input_ids)], device=self.vla.device)
        embeds = torch.cat([prefix, self._embed(ids)], dim=1)
        return self._run(embeds, DynamicCache(config=self.vla.lm.config), n_last)

    @torch.no_grad()
    def step(self, token_ids, cache, n_last: int | None = None):
        ids = torch.tensor([list(token_ids)], device=self.vla.device)
        return self._run(self._embed(ids), cache, n_last)

    def action_logits(self, hidden, logits):
        return logits[self._lo:self._hi]


def quantize_lm_bnb(vla, kind: str) -> None:
    """Replace the LM decoder's nn.Linear layers with bitsandbytes INT8 (LLM.int8) or NF4 layers in place."""
    if kind not in TORCH_QUANT:
        raise EdgeVLAError(f"unknown torch quantization `{kind}`", f"use one of {list(TORCH_QUANT)}")
    notices.silence("bitsandbytes.backends.cpu.ops")
    try:
        import bitsandbytes as bnb
    except Exception:
        raise MissingDependencyError("bitsandbytes", "PyTorch-side INT8/NF4 quantization") from None
    from torch import nn

    def convert(module):
        for name, child in module.named_children():
            if isinstance(child, nn.Linear):
                if kind == "int8":
                    q = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                            has_fp16_weights=False, threshold=6.0)
                    q.weight = bnb.nn.Int8Params(child.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
                else:
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=torch.float32, quant_type="nf4")
                    q.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False, quant_type="nf4")
                if child.bias is not None:
                    q.bias = nn.Parameter(child.bias.data.clone(), requires_grad=False)
                # Moving to the device is what quantizes the weights in bitsandbytes.
                setattr(module, name, q.to(child.weight.device))
            else:
                convert(child)

    convert(vla.lm.get_decoder())
