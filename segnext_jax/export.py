"""Serialized StableHLO (`jax.export`) of a SegNeXt checkpoint, with a symbolic batch size, for deployment.

    python -m segnext_jax.export --checkpoint=PATH --output=model.jaxexport --height H --width W

The artifact holds the weights and computes `infer_logits(model, images, key=jax.random.key(seed))`: the
whole-image inference of `segnext_jax.evaluation.inference` (padding to a multiple of 32, logits upsampled, padding
cropped) on `images` float32 (b, H, W, 3) normalised RGB (ImageNet mean / std), any batch size b, returning logits
(b, H, W, K) float32 at the input size. NMF bases: SegNeXt's decoder draws random bases at every call, so the
artifact takes an int32 `seed` scalar and derives them exactly as `infer_logits` does (image n of the batch from
`fold_in(key(seed), n)`): the same seed gives the model's own output, repeatably. Run it with jax alone:

    exported = jax.export.deserialize(open("model.jaxexport", "rb").read())
    logits = exported.call(images, np.int32(0))

For ONNX / TensorRT, export the weights to PyTorch instead (`python -m weights_conversion CHECKPOINT_DIR out.pth`,
or `weights_conversion.save_pytorch_checkpoint(model, path)`): the `.pth` loads into mmseg's SegNeXt, which
`torch.onnx.export` / MMDeploy take from there.
"""

from __future__ import annotations

import argparse
import pickle
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from segnext_jax.evaluation import inference
from segnext_jax.models import depthwise


def export_model(
    model: nnx.Module, height: int, width: int, *, platforms: Sequence[str] | None = None
) -> jax.export.Exported:
    """`jax.export` of the model's whole-image logits for (b, height, width, 3) inputs with a symbolic batch b.

    `platforms` (e.g. ('cpu', 'cuda')) are the backends the artifact can run on; default: the current one. The
    depth-wise convolutions are lowered in their 'portable' form (shift-add on CPU, XLA's grouped convolution
    elsewhere), so the artifact needs nothing but jax.
    """
    model = nnx.clone(model)
    # the artifact must run without this package: no calls into its C++ kernels (the 'native' depth-wise form)
    depthwise.set_implementation(model, "portable")
    graphdef, state = nnx.split(model)

    def segment(images: jax.Array, seed: jax.Array) -> jax.Array:
        return inference.infer_logits(nnx.merge(graphdef, state), images, key=jax.random.key(seed))

    (batch,) = jax.export.symbolic_shape("b")
    return jax.export.export(jax.jit(segment), platforms=platforms)(
        jax.ShapeDtypeStruct((batch, height, width, 3), jnp.float32), jax.ShapeDtypeStruct((), jnp.int32)
    )


def load_exported(path: str) -> jax.export.Exported:
    """Reads an artifact written by `main`; call it as `exported.call(images, np.int32(seed))`."""
    with open(path, "rb") as f:
        return jax.export.deserialize(bytearray(f.read()))


def main(argv: Sequence[str] | None = None) -> int:
    """Writes the artifact; returns 0, or 1 with a one-line error for an unusable checkpoint."""
    parser = argparse.ArgumentParser(prog="python -m segnext_jax.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="training workdir, model directory or PyTorch .pth")
    parser.add_argument("--output", required=True, help="artifact file, e.g. model.jaxexport")
    parser.add_argument("--height", type=int, required=True, help="input height of the exported function")
    parser.add_argument("--width", type=int, required=True, help="input width of the exported function")
    parser.add_argument("--platforms", nargs="+", help="backends to lower for, e.g. cpu cuda (default: current)")
    args = parser.parse_args(argv)
    from segnext_jax.predict import load_checkpoint

    try:
        model, _ = load_checkpoint(args.checkpoint)
    except (OSError, ValueError, KeyError, pickle.UnpicklingError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    exported = export_model(model, args.height, args.width, platforms=args.platforms)
    with open(args.output, "wb") as f:
        f.write(exported.serialize())
    classes = exported.out_avals[0].shape[-1]
    print(
        f"{args.output}: float32 (b, {args.height}, {args.width}, 3) normalised images + int32 seed -> "
        f"logits (b, {args.height}, {args.width}, {classes}) on {', '.join(exported.platforms)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
