"""Export a VLA to the ONNX graphs that a runtime chains together without torch.

    prefix.onnx       pixel_values (B, C, 3, S, S) [+ state (B, 8)]  -> prefix_embeds (B, P, H)
                      (vision tower + projector + camera embedding + proprio token)
    embed.onnx        input_ids (B, T)                                -> token_embeds (B, T, H)
    decoder.onnx      the decoder BODY: inputs_embeds (B, T, H), past_key_i / past_value_i
                      (B, kv, L, d) per layer -> hidden (B, H) of the last position,
                      present_key_i / present_value_i (B, kv, L+T, d). No LM head.
    lm_head.onnx      hidden (B, H) -> logits (B, V): the full-vocabulary head, run only for free
                      (reasoning) tokens and for parity
    action_head.onnx  hidden (N, H), dim (N,) -> bins, actions (env units), action_logits (N, 256):
                      the fused restricted head of edge_vla.kernels (the 256 action-token rows)

One decoder graph serves prefill (past length 0) and decode (T = 1): the KV cache travels as
plain tensors and is rebuilt inside the wrapper as a transformers DynamicCache, the form
torch.onnx's dynamo exporter handles (docs/facts.md). For ONNX Runtime targets the
decoder is instead built from the weights with ORT's fused ops (edge_vla.export.fused_decoder:
GroupQueryAttention, fused QKV and gate/up MatMuls), same inputs and outputs, ~1.25x faster INT8 steps. The LM head leaves the decoder
graph (edge_vla.kernels.onnx_graph.split_lm_head) because ONNX Runtime runs every node of a
graph whatever outputs are requested: inside the decoder, a direct-mode action token would pay
for the whole vocabulary head. Split, the bundle holds one copy of the head and direct mode
never reads it.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import torch
from torch import nn

from edge_vla import notices
from edge_vla.errors import EdgeVLAError
from edge_vla.artifacts.bundle import HIDDEN_ALL, PAST_LEN

PREFIX_GRAPH, EMBED_GRAPH, DECODER_GRAPH, ACTION_HEAD_GRAPH = "prefix.onnx", "embed.onnx", "decoder.onnx", "action_head.onnx"
LM_HEAD_GRAPH = "lm_head.onnx"
ACTION_LOGITS = "action_logits"  # extra output of the bundle's action-head graph (adaptive mode's entropy/margin)
OPSET = 18


def kv_names(n_layers: int, kind: str) -> list[str]:
    """Input (`past`) or output (`present`) cache names in graph order: key_0, value_0, key_1, ..."""
    out = []
    for i in range(n_layers):
        out += [f"{kind}_key_{i}", f"{kind}_value_{i}"]
    return out


def kv_shape(lm_config) -> tuple[int, int, int]:
    """(n_layers, n_kv_heads, head_dim) of a Hugging Face causal-LM config."""
    c = lm_config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.num_hidden_layers, getattr(c, "num_key_value_heads", None) or c.num_attention_heads, head_dim


class PrefixEncoder(nn.Module):
    def __init__(self, vla):
        super().__init__()
        self.vla = vla

    def forward(self, pixel_values, state=None):
        return self.vla.encode_prefix(pixel_values, state)


class TokenEmbed(nn.Module):
    def __init__(self, vla):
        super().__init__()
        self.embed = vla.lm.get_input_embeddings()

    def forward(self, input_ids):
        return self.embed(input_ids)


class DecoderWithCache(nn.Module):
    """inputs_embeds + flat past (k0, v0, k1, v1, ...) -> last hidden, last logits, flat present."""

    def __init__(self, vla):
        super().__init__()
        self.decoder = vla.lm.get_decoder()
        self.head = vla.lm.get_output_embeddings()
        self.lm_config = vla.lm.config
        self.parallel = bool(vla.config.parallel_actions)

    def forward(self, inputs_embeds, past):
        from transformers import DynamicCache

        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        cache = DynamicCache(pairs, config=self.lm_config)
        out = self.decoder(inputs_embeds=inputs_embeds, cache=cache, use_cache=True)
        last = out.last_hidden_state[:, -1:]
        # Apply the head to a 3-D tensor so it exports as MatMul (not Gemm): ORT's INT4
        # MatMulNBits quantizer only rewrites MatMul, and the head is a large share of the weights.
        logits = self.head(last)[:, 0]
        hidden = last[:, 0]
        present = []
        for layer in out.cache.layers:
            present += [layer.keys, layer.values]
        if self.parallel:  # every new position's hidden state: the chunk a parallel model decodes at once
            return (hidden, logits, *present, out.last_hidden_state)
        return (hidden, logits, *present)


@contextlib.contextmanager
def _quiet():
    """The dynamo exporter prints progress lines and warnings; keep the CLI output readable."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _export(module, args, path: Path, input_names, output_names, dynamic_shapes, what: str):
    try:
        with _quiet(), torch.no_grad():
            prog = torch.onnx.export(module, args, dynamo=True, input_names=input_names, output_names=output_names,
                                     dynamic_shapes=dynamic_shapes, opset_version=OPSET, external_data=False,
                                     verbose=False)
            prog.save(str(path), external_data=_needs_external(module))
    except EdgeVLAError:
        raise
    except Exception as e:
        raise EdgeVLAError(f"ONNX export of the {what} failed ({type(e).__name__}: {str(e).splitlines()[0][:300]})",
                           "report this model config; the tiny/minivla presets are known to export") from None


def _needs_external(module) -> bool:
    # protobuf caps one file at 2 GB: larger graphs keep their weights in a side file.
    return sum(p.numel() * p.element_size() for p in module.parameters()) > 1_800_000_000


def export_graphs(vla, out_dir: str | Path, fused_decoder: bool = False) -> dict:
    """Write the prefix/embed/decoder/lm_head[/action_head] graphs of `vla` (fp32) into `out_dir`;
    return their I/O names (the manifest's `graphs`).

    `fused_decoder`: build the decoder from the weights with ONNX Runtime's fused ops
    (edge_vla.export.fused_decoder: ~1.25x faster INT8 decode steps on CPU, deployment_ratios --levers) when the LM's architecture
    allows it; otherwise, and by default, the torch-exported graph of standard ops, which
    TensorRT also parses. The manifest records which (`graphs.decoder.form`)."""
    notices.silence("torch.onnx._internal.exporter._registration")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vla = vla.float().eval()
    cfg = vla.config
    batch = torch.export.Dim("batch", min=1, max=64)
    seq = torch.export.Dim("seq", min=1, max=8192)

    graphs: dict[str, dict] = {}
    graphs["prefix"] = export_prefix(PrefixEncoder(vla), cfg, vla.proprio is not None, out)

    ids = torch.zeros(2, 5, dtype=torch.long)
    _export(TokenEmbed(vla), (ids,), out / EMBED_GRAPH, ["input_ids"], ["token_embeds"],
            {"input_ids": {0: batch, 1: seq}}, "token embedding")
    graphs["embed"] = {"file": EMBED_GRAPH, "inputs": ["input_ids"], "outputs": ["token_embeds"]}

    n_layers, n_kv, hd = kv_shape(vla.lm.config)
    hidden = vla.lm.config.hidden_size
    from edge_vla.export.fused_decoder import build_fused_decoder, fused_decoder_unsupported

    in_names = ["inputs_embeds", *kv_names(n_layers, "past")]
    why_not = fused_decoder_unsupported(vla.lm) if fused_decoder else "not asked for"
    if why_not is None:
        head = vla.lm.get_output_embeddings()
        bias = None if getattr(head, "bias", None) is None else head.bias.detach().float().numpy()
        graphs.update(split_decoder(vla, build_fused_decoder(vla.lm, head.weight.detach().float().numpy(), bias,
                                                             all_hidden=cfg.parallel_actions), out))
        form = "onnxruntime-fused"
        graphs["decoder"]["cache_length"] = PAST_LEN
    else:
        full = out / ".decoder_with_head.onnx"
        in_names, _ = export_full_decoder(vla, full)
        graphs.update(split_decoder(vla, full, out))
        for f in out.glob(full.name + "*"):  # the graph and any external-data side file
            f.unlink()
        form = "torch-export"
    graphs["decoder"].update({"inputs": in_names, "n_layers": n_layers, "n_kv_heads": n_kv, "head_dim": hd,
                              "hidden_size": hidden, "form": form})
    if fused_decoder and why_not is not None:
        graphs["decoder"]["form_note"] = f"fused decoder not used: {why_not}"
    if vla.action_stats is not None:
        graphs["action_head"] = export_action_head(vla, out / ACTION_HEAD_GRAPH)
    return graphs


def export_prefix(module, cfg, proprio: bool, out: Path) -> dict:
    """prefix.onnx of `module` (pixel_values [, state] -> prefix_embeds): a PrefixEncoder, or the
    streaming export's vision-only module (no language model in memory)."""
    batch = torch.export.Dim("batch", min=1, max=64)
    pv = torch.zeros(2, len(cfg.cameras), 3, cfg.image_size, cfg.image_size)
    if proprio:
        args, names, dyn = (pv, torch.zeros(2, cfg.proprio_dim)), ["pixel_values", "state"], {
            "pixel_values": {0: batch}, "state": {0: batch}}
    else:
        args, names, dyn = (pv,), ["pixel_values"], {"pixel_values": {0: batch}}
    _export(module, args, Path(out) / PREFIX_GRAPH, names, ["prefix_embeds"], dyn, "vision tower + projector")
    return {"file": PREFIX_GRAPH, "inputs": names, "outputs": ["prefix_embeds"]}


def export_full_decoder(vla, path: Path) -> tuple[list[str], list[str]]:
    """The decoder WITH its LM head (outputs hidden, logits, present_*), as torch exports it.
    export_graphs splits it; tests and benchmarks use it as the unsplit reference."""
    vla = vla.float().eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    seq = torch.export.Dim("seq", min=1, max=8192)
    past_len = torch.export.Dim("past", min=0, max=8192)
    n_layers, n_kv, hd = kv_shape(vla.lm.config)
    past = tuple(torch.zeros(2, n_kv, 3, hd) for _ in range(2 * n_layers))
    emb = torch.zeros(2, 4, vla.lm.config.hidden_size)
    in_names = ["inputs_embeds", *kv_names(n_layers, "past")]
    out_names = ["hidden", "logits", *kv_names(n_layers, "present")] + ([HIDDEN_ALL] if vla.config.parallel_actions else [])
    dyn = {"inputs_embeds": {0: batch, 1: seq}, "past": tuple({0: batch, 2: past_len} for _ in past)}
    _export(DecoderWithCache(vla), (emb, past), Path(path), in_names, out_names, dyn, "decoder")
    return in_names, out_names


def split_decoder(vla, full, out_dir: Path) -> dict:
    """decoder.onnx (body: hidden + present_*) and lm_head.onnx (hidden -> logits) from the full decoder
    (a path or an onnx.ModelProto)."""
    import onnx

    from edge_vla.kernels.onnx_graph import split_lm_head

    head = vla.lm.get_output_embeddings()
    bias = None if getattr(head, "bias", None) is None else head.bias.detach().float().numpy()
    full = full if isinstance(full, onnx.ModelProto) else onnx.load(str(full))
    body, lm_head = split_lm_head(full, head.weight.detach().float().numpy(), bias)
    external = body.ByteSize() > 1_800_000_000  # protobuf's 2 GB cap, as in _export
    onnx.save(body, str(out_dir / DECODER_GRAPH), save_as_external_data=external,
              location=DECODER_GRAPH + ".data" if external else None)
    external = lm_head.ByteSize() > 1_800_000_000
    onnx.save(lm_head, str(out_dir / LM_HEAD_GRAPH), save_as_external_data=external,
              location=LM_HEAD_GRAPH + ".data" if external else None)
    return {"decoder": {"file": DECODER_GRAPH, "outputs": [o.name for o in body.graph.output]},
            "lm_head": {"file": LM_HEAD_GRAPH, "inputs": ["hidden"], "outputs": ["logits"]}}


def export_action_head(vla, path: Path) -> dict:
    """The restricted action head of edge_vla.kernels (hidden (N, H), dim (N,) -> bins, and the action
    logits) built from the action-token rows of the LM head: 256 rows instead of the whole vocabulary.
    It stops at the bins: the Policy de-normalises them with the checkpoint's ActionTokenizer, the
    same for every backend and mode."""
    from edge_vla.kernels.reference import action_head_rows

    tok = vla.processor.tokenizer
    head = vla.lm.get_output_embeddings()
    bias = None if getattr(head, "bias", None) is None else head.bias.detach().float().numpy()
    weight, bias = action_head_rows(head.weight.detach().float().numpy(), tok.first_action_id, tok.n_bins, bias)
    return write_action_head(weight, bias, tok.n_bins, path)


def write_action_head(weight, bias, n_bins: int, path: Path) -> dict:
    """action_head.onnx from the action-token rows (n_bins, H) of the LM head (and their bias)."""
    import onnx

    from edge_vla.kernels.onnx_graph import build_action_head_graph

    model = build_action_head_graph(weight, None, None, None, bias, actions_name=None)
    # Expose the 256 action logits too (adaptive mode's entropy/margin, the parity check): the graph
    # computes them anyway, so the restricted head serves every mode.
    logits = "action_head/logits_b" if bias is not None else "action_head/logits"
    model.graph.node.append(onnx.helper.make_node("Identity", [logits], [ACTION_LOGITS], name="action_head/logits_out"))
    model.graph.output.append(onnx.helper.make_tensor_value_info(ACTION_LOGITS, onnx.TensorProto.FLOAT,
                                                                 ["rows", n_bins]))
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return {"file": path.name, "inputs": ["hidden", "dim"], "outputs": ["bins", ACTION_LOGITS]}
