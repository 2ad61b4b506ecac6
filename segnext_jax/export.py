"""Serialized StableHLO (`jax.export`) or ONNX of a SegNeXt checkpoint, with a symbolic batch size, for deployment.

    python -m segnext_jax.export --checkpoint=PATH --output=model.jaxexport --height H --width W
    python -m segnext_jax.export --format=onnx --checkpoint=PATH --output=model.onnx --height H --width W

The artifact holds the weights and computes `infer_logits(model, images, key=jax.random.key(seed))`: the
whole-image inference of `segnext_jax.evaluation.inference` (padding to a multiple of 32, logits upsampled, padding
cropped) on `images` float32 (b, H, W, 3) normalised RGB (ImageNet mean / std), any batch size b, returning logits
(b, H, W, K) float32 at the input size. NMF bases: SegNeXt's decoder draws random bases at every call, so the
artifact takes an int32 `seed` scalar and derives them exactly as `infer_logits` does (image n of the batch from
`fold_in(key(seed), n)`): the same seed gives the model's own output, repeatably. Run it with jax alone:

    exported = jax.export.deserialize(open("model.jaxexport", "rb").read())
    logits = exported.call(images, np.int32(0))

The artifact of a model built with nmf_bases='fixed', or exported with --nmf_bases=seed:N, has the bases baked in
and takes the images alone (`exported.call(images)`): the stored bases, or those `infer_logits(model, image[None],
key=jax.random.key(N))` draws, for every image.

--format=onnx writes an ONNX model instead (jax2onnx; see segnext_jax.onnx_export), which takes the images alone and
bakes in the NMF bases (the stored ones, else seed 0; --nmf_bases=seed:N) or takes them as a second input
(--nmf_bases=input); --dynamic_size leaves height and width free (multiples of 32).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from etils import epath
from flax import nnx

from segnext_jax import console, onnx_export, paths
from segnext_jax.evaluation import inference
from segnext_jax.models import depthwise
from segnext_jax.serving import loading

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")  # what jax.export lowers for
FORMATS = ("jaxexport", "onnx")


def export_model(
    model: nnx.Module,
    height: int,
    width: int,
    *,
    platforms: Sequence[str] | None = None,
    nmf_seed: int | None = None,
) -> jax.export.Exported:
    """`jax.export` of the model's whole-image logits for (b, height, width, 3) inputs with a symbolic batch b.

    `platforms` (e.g. ('cpu', 'cuda')) are the backends the artifact can run on; default: the current one. The
    depth-wise convolutions are lowered in their 'portable' form (shift-add on CPU, XLA's grouped convolution
    elsewhere), so the artifact needs nothing but jax. The artifact takes (images, int32 seed), or the images alone
    when the NMF bases are baked in: those of `nmf_seed` if given, else the stored ones of a nmf_bases='fixed' model.
    """
    model = nnx.clone(model)
    # the artifact must run without this package: no calls into its C++ kernels (the 'native' depth-wise form)
    depthwise.set_implementation(model, "portable")
    baked = inference.baked_nmf_bases(model, nmf_seed)
    graphdef, state = nnx.split(model)
    (batch,) = jax.export.symbolic_shape("b")
    images = jax.ShapeDtypeStruct((batch, height, width, 3), jnp.float32)

    if baked is not None:

        def segment_baked(images: jax.Array) -> jax.Array:
            n = images.shape[0]
            bases = jnp.broadcast_to(baked[None], (n, *baked.shape)).reshape(n * baked.shape[0], *baked.shape[1:])
            return inference.infer_logits(nnx.merge(graphdef, state), images, nmf_bases=bases)

        return jax.export.export(jax.jit(segment_baked), platforms=platforms)(images)

    def segment(images: jax.Array, seed: jax.Array) -> jax.Array:
        return inference.infer_logits(nnx.merge(graphdef, state), images, key=jax.random.key(seed))

    return jax.export.export(jax.jit(segment), platforms=platforms)(images, jax.ShapeDtypeStruct((), jnp.int32))


def load_exported(path: str) -> jax.export.Exported:
    """Reads an artifact written by `main`; call it as `exported.call(images, np.int32(seed))`, or
    `exported.call(images)` when it has the NMF bases baked in (`len(exported.in_avals) == 1`)."""
    with open(path, "rb") as f:
        return jax.export.deserialize(bytearray(f.read()))


def positive_int(text: str) -> int:
    """argparse type of --height / --width: an integer > 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value}: give a size in pixels > 0")
    return value


def nmf_bases_option(text: str) -> int | str:
    """argparse type of --nmf_bases: 'seed:N' (N, an int >= 0) or 'input'."""
    if text == "input":
        return text
    seed = text.removeprefix("seed:")
    if seed == text or not seed.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: give seed:N (N an integer >= 0, e.g. seed:0) or input")
    return int(seed)


def output_problem(output: str, target: str) -> str | None:
    """Why the artifact `target` (the user's `output`, resolved) cannot be written, or None if it can.

    The nearest existing folder above it must be a folder we may write into (the folders in between are created).
    """
    if paths.is_url(target):
        return None
    problem = paths.why_not_creatable(target)
    if problem:
        return f"--output {output}: {problem}"
    if os.path.isdir(target):
        return f"--output {output} is a folder: give the artifact's file name, e.g. {output}/model.jaxexport"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Writes the artifact; returns 0, or 1 with a one-line error for a missing or unusable checkpoint."""
    parser = argparse.ArgumentParser(prog="python -m segnext_jax.export", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--checkpoint", required=True, help="training workdir, model directory, PyTorch .pth or JSeg .pkl"
    )
    parser.add_argument("--output", required=True, help="artifact file, e.g. model.jaxexport or model.onnx")
    parser.add_argument("--height", type=positive_int, help="input height of the exported function")
    parser.add_argument("--width", type=positive_int, help="input width of the exported function")
    parser.add_argument("--format", choices=FORMATS, default="jaxexport", help="artifact format (default: jaxexport)")
    parser.add_argument(
        "--platforms", nargs="+", choices=PLATFORMS, help="backends to lower for, e.g. cpu cuda (default: current)"
    )
    parser.add_argument(
        "--nmf_bases",
        type=nmf_bases_option,
        help="seed:N bakes in the NMF bases of seed N; input (onnx) makes them an input (default: the model's "
        "stored bases; else a seed input (jaxexport) or seed:0 (onnx))",
    )
    parser.add_argument(
        "--dynamic_size", action="store_true", help="onnx: any height and width, multiples of 32 (no --height/--width)"
    )
    args = parser.parse_args(argv)
    is_onnx = args.format == "onnx"
    if (args.dynamic_size or args.nmf_bases == "input") and not is_onnx:
        parser.error("--dynamic_size and --nmf_bases=input apply to --format=onnx only")
    if args.platforms and is_onnx:
        parser.error("--platforms applies to --format=jaxexport only (an ONNX model runs where onnxruntime does)")
    if args.dynamic_size and (args.height or args.width):
        parser.error("--dynamic_size takes any height and width: leave out --height and --width")
    if not args.dynamic_size and not (args.height and args.width):
        parser.error("the following arguments are required: --height, --width (or, for onnx, --dynamic_size)")
    console.quiet_library_noise()
    checkpoint, output = paths.resolve(args.checkpoint), paths.resolve(args.output)
    problem = None
    if not paths.is_url(checkpoint) and not os.path.exists(checkpoint):
        problem = f"--checkpoint {args.checkpoint}: no such file or directory"
    problem = problem or output_problem(args.output, output)
    if problem is None and is_onnx:
        try:
            onnx_export.require_jax2onnx()
        except onnx_export.OnnxExportUnavailable as error:
            problem = str(error)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    try:
        model, _ = loading.load(checkpoint)
    except (*loading.CHECKPOINT_ERRORS, OSError) as error:  # a bad checkpoint, or the file system refusing
        print(f"error: {error}", file=sys.stderr)
        return 1
    artifact = epath.Path(output)
    seed = args.nmf_bases if isinstance(args.nmf_bases, int) else None
    if is_onnx:
        proto = onnx_export.export_onnx(
            model, args.height, args.width, nmf_seed=seed, nmf_bases_input=args.nmf_bases == "input"
        )
        artifact.parent.mkdir(parents=True, exist_ok=True)
        artifact.write_bytes(proto.SerializeToString())
        print(f"{args.output}: {onnx_summary(proto)}")
        return 0
    exported = export_model(model, args.height, args.width, platforms=args.platforms, nmf_seed=seed)
    artifact.parent.mkdir(parents=True, exist_ok=True)
    artifact.write_bytes(exported.serialize())
    classes = exported.out_avals[0].shape[-1]
    baked = len(exported.in_avals) == 1
    inputs = "normalised images (NMF bases baked in)" if baked else "normalised images + int32 seed"
    print(
        f"{args.output}: float32 (b, {args.height}, {args.width}, 3) {inputs} -> "
        f"logits (b, {args.height}, {args.width}, {classes}) on {', '.join(exported.platforms)}"
    )
    return 0


def onnx_summary(proto) -> str:
    """'images float32 (batch, H, W, 3) [+ nmf_bases ...] -> logits float32 (batch, H, W, K); ...' of an ONNX model."""

    def describe(value) -> str:
        dims = [d.dim_param or str(d.dim_value) for d in value.type.tensor_type.shape.dim]
        return f"{value.name} float32 ({', '.join(dims)})"

    inputs = " + ".join(describe(value) for value in proto.graph.input)
    props = {prop.key: prop.value for prop in proto.metadata_props}
    return (
        f"ONNX opset {proto.opset_import[0].version}: {inputs} -> {describe(proto.graph.output[0])}; "
        f"NMF bases {props['nmf_bases']}"
    )


if __name__ == "__main__":
    sys.exit(console.reporting_bugs(main)())
