"""`edge-vla export CKPT --int8 -o BUNDLE`: a checkpoint -> a verified, quantized ONNX bundle."""

from __future__ import annotations

import click


@click.command()
@click.argument("checkpoint", type=click.Path(path_type=str))
@click.option("-o", "--output", required=True, type=click.Path(path_type=str), help="Bundle directory to write.")
@click.option("--int8", "precision", flag_value="int8",
              help="Dynamic INT8 (ONNX Runtime; the CPU default): MatMul weights in symmetric 8-bit blocks "
                   "of 256 with int8 compute, other weights per-channel; activations quantized on the fly. "
                   "TensorRT targets get per-channel MatMulInteger. Default: the target's.")
@click.option("--int8-matmul", "int8_matmul", default="auto", show_default=True,
              type=click.Choice(["auto", "nbits", "integer"]),
              help="The --int8 decoder's MatMul kernel on ONNX Runtime targets: nbits (MatMulNBits blocks, faster "
                   "single-token decode steps), integer (MatMulInteger, ~2x faster at a prefill's hundreds of rows), "
                   "auto: integer when the checkpoint's action is one prefill (direct decode mode and "
                   "model.parallel_actions), nbits otherwise. Recorded in the manifest.")
@click.option("--int8-static", "precision", flag_value="int8-static",
              help="Static QDQ INT8 calibrated on --data (for accelerator targets).")
@click.option("--int4", "precision", flag_value="int4", help="Weight-only 4-bit blocks (MatMulNBits), embedding too.")
@click.option("--int4-block", type=int, default=None,
              help="INT4 block size (power of two, 16-256; default 64, llama.cpp Q4_0's 4.5 bits per weight); "
                   "larger blocks decode faster on a CPU, smaller ones keep more precision.")
@click.option("--int4-keep8", type=click.IntRange(min=0), default=0, metavar="K",
              help="With --int4: keep the K decoder MatMuls whose 4-bit rounding moves the decoder's output most "
                   "(measured on --data before quantizing) at 8 bits. Mixed precision for models that lose too "
                   "much at 4 bits; each one adds its share of the weights at 8 bits. Recorded in the manifest.")
@click.option("--fp16", "precision", flag_value="fp16", help="float16 weights.")
@click.option("--fp32", "precision", flag_value="fp32", help="No quantization.")
@click.option("--vision-precision", default=None,
              type=click.Choice(["fp32", "fp16", "int8", "int8-static", "int4"]),
              help="Precision of the vision graph (default: the decoder's; int8 when the decoder is int4).")
@click.option("--target", default="cpu", show_default=True, help="Deployment target name (see edge_vla.deploy.targets).")
@click.option("--data", default=None, type=click.Path(path_type=str),
              help="Held-out samples for the accuracy report, calibration and parity.")
@click.option("--min-agreement", type=float, default=None,
              help="Refuse the bundle when its action-token agreement with fp32 (free-running, in the recipe's own "
                   "decode mode) is below this fraction (e.g. 0.99).")
@click.option("--streaming/--no-streaming", default=None,
              help="Export without loading the model: weights read from the shards one at a time, the decoder "
                   "quantized as it is built, parity per layer and against a streamed PyTorch reference "
                   "(int4, int8, fp32; ONNX Runtime targets). Default: for checkpoints over 2B parameters.")
@click.option("--overwrite", is_flag=True,
              help="Replace OUTPUT even when it is not a bundle (a bundle is replaced without it; "
                   "the checkpoint and --data never are).")
def export(checkpoint, output, precision, int8_matmul, int4_block, int4_keep8, vision_precision, target, data,
           min_agreement, streaming, overwrite):
    """Export CHECKPOINT to an ONNX bundle that runs without PyTorch.

    Every export checks parity against PyTorch (logit difference, greedy-token agreement) and
    refuses to write a bundle that fails; a quantized bundle's accuracy against its fp32 source
    is printed and stored in the manifest.
    """
    from edge_vla.export import export_bundle
    from edge_vla.deploy.targets import export_precision_for

    if precision is None:
        precision = export_precision_for(target)
        click.echo(f"precision: {precision} (the default for target {target})")
    export_bundle(checkpoint, output, precision=precision, calibration_data=data, parity_samples=data,
                  target=target, vision_precision=vision_precision, min_action_agreement=min_agreement,
                  report=click.echo, overwrite=overwrite, streaming=streaming, int8_matmul=int8_matmul,
                  int4_block=int4_block, int4_keep8=int4_keep8)
