"""ONNX export of a SegNeXt model through jax2onnx, for onnxruntime (checked in the tests) and other ONNX runtimes.

    python -m segnext_jax.export --format=onnx --checkpoint=PATH --output=model.onnx --height H --width W

The graph computes the whole-image inference of `segnext_jax.evaluation.inference.infer_logits` (zero padding to a
multiple of 32, the network, logits resized bilinearly to the padded size, padding cropped) on its input `images`
float32 (batch, H, W, 3), normalised RGB (ImageNet mean / std), any batch size; its output `logits` is float32
(batch, H, W, K). With `dynamic_size` (CLI: --dynamic_size) height and width are free too, as multiples of 32 (pad
the images first).

NMF bases, which SegNeXt's decoder draws at random at every call: by default a model built with
nmf_bases='fixed' bakes its stored bases into the graph as constants, and another model the bases that
`infer_logits(..., key=jax.random.key(0))` draws for an image (seed 0). `nmf_seed=N` (CLI: --nmf_bases=seed:N) bakes
those of seed N instead; either way every image of a batch starts from the same bases, so an image's logits are
those of `infer_logits(model, image[None], key=jax.random.key(N))` whatever the batch. `nmf_bases_input=True` (CLI:
--nmf_bases=input) makes them a second input `nmf_bases` float32 (batch, S, D, R) instead: the reference's fresh
random bases are then uniform [0, 1) numbers, each column (over D) divided by its L2 norm.

The depth-wise convolutions are exported as grouped convolutions (the 'xla' form) and every stage's blocks one
after the other, so the graph has no custom operator and no loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

from segnext_jax import backend
from segnext_jax.evaluation import inference
from segnext_jax.models import depthwise
from segnext_jax.models.layers import resize_bilinear

if TYPE_CHECKING:
    import onnx

SIZE_DIVISOR = inference.SIZE_DIVISOR
INPUT_NAMES = ("images", "nmf_bases")
OUTPUT_NAME = "logits"

# jax.image.resize as JAX defines it, taken before any conversion: jax2onnx replaces it while it converts by a
# primitive that needs every dimension static (no symbolic batch); JAX's own is plain arithmetic that converts.
_JAX_IMAGE_RESIZE = jax.image.resize


class OnnxExportUnavailable(ImportError):
    """jax2onnx or onnx is not installed."""


def require_jax2onnx() -> None:
    """Raises OnnxExportUnavailable, saying what to install, unless jax2onnx and onnx can be imported."""
    try:
        import jax2onnx  # noqa: F401
        import onnx  # noqa: F401
    except ImportError as error:
        raise OnnxExportUnavailable(
            f"ONNX export needs jax2onnx and onnx ({error}): pip install 'jax2onnx==0.13.0' onnx onnxruntime"
        ) from None


@contextlib.contextmanager
def _jax_image_resize() -> Iterator[None]:
    """JAX's own `jax.image.resize` inside (see `_JAX_IMAGE_RESIZE`), whatever jax2onnx put in its place."""
    replaced = jax.image.resize
    jax.image.resize = _JAX_IMAGE_RESIZE
    try:
        yield
    finally:
        jax.image.resize = replaced


@contextlib.contextmanager
def _quiet_converter() -> Iterator[None]:
    """Only errors from jax2onnx and onnx_ir (plugins of other libraries that do not import, shapes they skip)."""
    loggers = [logging.getLogger(name) for name in ("jax2onnx", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def export_onnx(
    model: nnx.Module,
    height: int | None = None,
    width: int | None = None,
    *,
    nmf_seed: int | None = None,
    nmf_bases_input: bool = False,
) -> onnx.ModelProto:
    """The ONNX model (an `onnx.ModelProto`) of `model`'s whole-image logits, with a dynamic batch size.

    `height` and `width` fix the input size (any size: the graph pads to a multiple of 32); both None make them
    dynamic, multiples of 32. NMF bases: see the module docstring (`nmf_seed`, `nmf_bases_input`; by default the
    model's stored bases, else seed 0). The model itself is left as it is.
    """
    require_jax2onnx()
    import onnx
    from jax2onnx import to_onnx

    if (height is None) != (width is None):
        raise ValueError("give both height and width, or neither (dynamic size)")
    if nmf_bases_input and nmf_seed is not None:
        raise ValueError("nmf_seed bakes the NMF bases in; nmf_bases_input makes them an input: choose one")
    model = nnx.clone(model)
    depthwise.set_implementation(model, "xla")  # grouped convolutions: no C++ kernel call, no shift-add slices
    model.eval()
    splits, dim, rank = inference.nmf_bases_shape(model)
    baked = None
    if not nmf_bases_input:
        baked = inference.baked_nmf_bases(model, nmf_seed)
        if baked is None:  # a model that draws random bases: those of seed 0
            baked = inference.seeded_nmf_bases(model, 0)
    graphdef, state = nnx.split(model)
    dynamic = height is None

    def segment(images: jax.Array, bases: jax.Array | None = None) -> jax.Array:
        b, h, w, _ = images.shape
        x = images if dynamic else jnp.pad(images, ((0, 0), (0, -h % SIZE_DIVISOR), (0, -w % SIZE_DIVISOR), (0, 0)))
        if bases is None:
            bases = jnp.broadcast_to(baked[None], (b, splits, dim, rank))
        with _jax_image_resize():
            logits = nnx.merge(graphdef, state)(x, nmf_bases=bases.reshape(b * splits, dim, rank))
            logits = resize_bilinear(logits, x.shape[1:3])
        return logits[:, :h, :w]

    if dynamic:
        batch, sym_height, sym_width = jax.export.symbolic_shape(f"batch, {SIZE_DIVISOR}*h, {SIZE_DIVISOR}*w")
    else:
        (batch,), sym_height, sym_width = jax.export.symbolic_shape("batch"), height, width
    inputs = [jax.ShapeDtypeStruct((batch, sym_height, sym_width, 3), jnp.float32)]
    if nmf_bases_input:
        inputs.append(jax.ShapeDtypeStruct((batch, splits, dim, rank), jnp.float32))
    # XLA's own operations (the GPU policy) with every stage's blocks inlined: no loop in the graph
    policy = dataclasses.replace(backend.policy_for("gpu"), max_inlined_blocks=sys.maxsize)
    with backend.use(policy), _quiet_converter():
        proto = to_onnx(
            segment,
            inputs,
            model_name="segnext",
            input_names=list(INPUT_NAMES[: len(inputs)]),
            output_names=[OUTPUT_NAME],
        )
    del proto.graph.value_info[:]  # jax2onnx's intermediate shapes (onnxruntime warns of some): it infers its own
    names = {f"{SIZE_DIVISOR}*h": "height", f"{SIZE_DIVISOR}*w": "width"}
    for value in [*proto.graph.input, *proto.graph.output]:
        for d in value.type.tensor_type.shape.dim:
            if d.HasField("dim_param"):
                d.dim_param = names.get(d.dim_param, d.dim_param)
    bases_note = "input nmf_bases" if nmf_bases_input else "baked in"
    onnx.helper.set_model_props(
        proto,
        {
            "images": "float32 (batch, height, width, 3) RGB, normalised with the ImageNet mean and std",
            "logits": f"float32 (batch, height, width, {model.num_classes}) at the input size",
            "size": f"multiples of {SIZE_DIVISOR}" if dynamic else f"{height}x{width}",
            "nmf_bases": bases_note,
        },
    )
    return proto
