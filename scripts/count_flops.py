"""Parameters and FLOPs per SegNeXt variant, from XLA's cost analysis and from the traced program, beside the paper.

Usage: python scripts/count_flops.py [--variants=t,s,b,l] [--size=512x512] [--train_batch=0]
           [--train_variants=t,b] [--output=benchmarks/flops.md]

Counts, for one image of --size in evaluation mode (and, with --train_batch B > 0, for the training step of
scripts/benchmark.py at batch B, for --train_variants, by default all of --variants):
- XLA FLOPs: `jax.jit(f).lower(...).compile().cost_analysis()['flops']`. XLA counts a multiply-add as 2 FLOPs and
  also counts every element-wise operation (norms, GELU, softmax, NMF updates), so XLA GFLOPs / 2 is above the
  multiply-add count. XLA counts the body of a while loop once, whatever its trip count, and the model runs each
  stage's blocks as a `jax.lax.scan`; scans are therefore unrolled while tracing here (`unroll=True`).
- conv + matmul GMACs: the multiply-adds of every convolution and matrix product in the traced jaxpr (scan bodies
  times their length), the quantity that the paper's "GFLOPs" and fvcore's GMACs count.
- XLA GB accessed: `cost_analysis()['bytes accessed']` of the optimised (fused) program: what its kernels read and
  write, each use of a fused operand counted in full. The shift-add form's taps read overlapping slices of one
  input, so it is charged up to kh*kw times that input (52x for a 7x7 kernel, against 2x as a convolution); its
  DRAM traffic is lower when those slices hit in cache. The 'xla' form's count is the closer estimate of the
  traffic the model needs.
Depth-wise convolutions are counted both as XLA grouped convolutions (depthwise_impl='xla') and as the shift-add
form that runs on CPU (each tap one multiply and one add, so the FLOPs agree).
The paper's numbers (Guo et al. 2022, ADE20K table: 6.6 / 15.9 / 34.9 / 70.0 "GFLOPs" at 512x512) are
multiply-adds. fvcore's `FlopCountAnalysis` of MMSegmentation 1.2.2's `EncoderDecoder` (MSCAN + LightHamHead, 150
classes, one 512x512 image; conv + matmul, the NMF's products included) counts 6.45 / 15.72 / 34.76 / 69.84 GMACs.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import sys
from collections.abc import Callable, Iterator

import jax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark import NUM_CLASSES, REPO, Config, ours_program, parse_size  # noqa: E402
from oracle import build_reference  # noqa: E402  (on sys.path through benchmark)

from segnext_jax import models  # noqa: E402

PAPER_GFLOPS = {"t": 6.6, "s": 15.9, "b": 34.9, "l": 70.0}  # SegNeXt paper, ADE20K, 512x512 (multiply-adds)
FVCORE_GMACS = {"t": 6.45, "s": 15.72, "b": 34.76, "l": 69.84}  # fvcore on mmseg 1.2.2's modules, 512x512


@contextlib.contextmanager
def unrolled_scans() -> Iterator[None]:
    """Traces every `jax.lax.scan` fully unrolled, so that XLA's cost analysis sees each iteration."""
    original = jax.lax.scan
    jax.lax.scan = functools.partial(original, unroll=True)
    try:
        yield
    finally:
        jax.lax.scan = original


def _sub_jaxprs(params: dict) -> Iterator[jax.extend.core.Jaxpr]:
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, jax.extend.core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jax.extend.core.Jaxpr):
                yield item


def matmul_macs(jaxpr: jax.extend.core.Jaxpr) -> int:
    """Multiply-adds of the convolutions and matrix products in `jaxpr`, nested jaxprs included (scans times their
    length)."""
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        out_size = math.prod(eqn.outvars[0].aval.shape) if name in ("dot_general", "conv_general_dilated") else 0
        if name == "dot_general":
            (contracting, _), _ = eqn.params["dimension_numbers"]
            lhs_shape = eqn.invars[0].aval.shape
            total += out_size * math.prod(lhs_shape[d] for d in contracting)
        elif name == "conv_general_dilated":
            rhs_shape = eqn.invars[1].aval.shape
            out_features = rhs_shape[eqn.params["dimension_numbers"].rhs_spec[0]]
            total += out_size * math.prod(rhs_shape) // out_features  # kernel taps x input channels per group
        repeat = eqn.params["length"] if name == "scan" else 1
        total += repeat * sum(matmul_macs(sub) for sub in _sub_jaxprs(eqn.params))
    return total


def costs(fn: Callable, args: tuple) -> dict[str, float]:
    """XLA GFLOPs and GB accessed of the compiled `fn(*args)` (scans unrolled), and its conv + matmul GMACs."""
    with unrolled_scans():
        analysis = fn.lower(*args).compile().cost_analysis()
        macs = matmul_macs(jax.make_jaxpr(fn)(*args).jaxpr)
    return {"gflops": analysis["flops"] / 1e9, "gbytes": analysis["bytes accessed"] / 1e9, "gmacs": macs / 1e9}


def reference_params(variant: str) -> int:
    """Parameter count of mmseg's MSCAN + LightHamHead for `variant`."""
    backbone, head = build_reference(variant, NUM_CLASSES, randomize=False)
    return sum(p.numel() for module in (backbone, head) for p in module.parameters())


def count(variant: str, size: tuple[int, int], train_batch: int) -> dict:
    """Parameters and costs of `variant` with both depth-wise forms: eval at batch 1, training at `train_batch`."""
    model = models.create(variant, NUM_CLASSES, rngs=nnx.Rngs(0))
    row = {
        "variant": variant,
        "params": sum(leaf.size for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))),
        "reference_params": reference_params(variant),
    }
    configs = [Config(variant, "eval", 1, *size)]
    if train_batch > 0:
        configs.append(Config(variant, "train", train_batch, *size))
    for config in configs:
        for impl in ("xla", "shift_add"):
            fn, args = ours_program(config, dtype="float32", depthwise_impl=impl)
            row[f"{config.mode}_{impl}"] = costs(fn, args)
    return row


def markdown(rows: list[dict], size: tuple[int, int], train_batch: int) -> str:
    """The counts as a markdown page."""
    height, width = size
    lines = [
        f"# SegNeXt parameters and FLOPs ({height}x{width}, {NUM_CLASSES} classes)",
        "",
        "Written by `python scripts/count_flops.py`; see its docstring for what each column counts. "
        "XLA counts a multiply-add as 2 FLOPs and counts element-wise work too; the paper's \"GFLOPs\" and fvcore's "
        'GMACs are multiply-adds (conv + matmul), comparable with the "conv + matmul GMACs" column.',
        "",
        f"## Evaluation forward, 1 image of {height}x{width}",
        "",
        "| variant | params (M) | mmseg params (M) | paper GFLOPs (MACs) | fvcore GMACs | conv + matmul GMACs (ours) "
        "| XLA GFLOPs (xla depth-wise) | XLA GFLOPs / 2 | XLA GFLOPs (shift-add depth-wise) "
        "| XLA GB accessed (xla / shift-add) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        xla, shift = r["eval_xla"], r["eval_shift_add"]
        paper = f"{PAPER_GFLOPS[r['variant']]}" if size == (512, 512) else "-"
        fvcore = f"{FVCORE_GMACS[r['variant']]}" if size == (512, 512) else "-"
        lines.append(
            f"| {r['variant'].upper()} | {r['params'] / 1e6:.2f} | {r['reference_params'] / 1e6:.2f} | {paper} "
            f"| {fvcore} | {xla['gmacs']:.2f} | {xla['gflops']:.2f} | {xla['gflops'] / 2:.2f} "
            f"| {shift['gflops']:.2f} | {xla['gbytes']:.2f} / {shift['gbytes']:.2f} |"
        )
    if train_batch:
        lines += [
            "",
            f"## Training step (forward, loss at full resolution, backward, AdamW), batch {train_batch}, "
            f"{height}x{width}",
            "",
            "| variant | conv + matmul GMACs (xla depth-wise) | XLA GFLOPs (xla / shift-add) "
            "| XLA GB accessed (xla / shift-add) |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {r['variant'].upper()} | {r['train_xla']['gmacs']:.2f} "
            f"| {r['train_xla']['gflops']:.2f} / {r['train_shift_add']['gflops']:.2f} "
            f"| {r['train_xla']['gbytes']:.2f} / {r['train_shift_add']['gbytes']:.2f} |"
            for r in rows
            if "train_xla" in r
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    """Counts every requested variant and writes the markdown table; returns the rows."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default="t,s,b,l")
    parser.add_argument("--size", type=parse_size, default=(512, 512))
    parser.add_argument("--train_batch", type=int, default=0, help="also count the training step at this batch")
    parser.add_argument("--train_variants", default=None, help="variants whose training step is counted")
    parser.add_argument("--output", default=os.path.join(REPO, "benchmarks", "flops.md"))
    args = parser.parse_args(argv)
    rows = []
    for variant in args.variants.split(","):
        print(f"counting {variant} ...", flush=True)
        train = variant in (args.train_variants or args.variants).split(",")
        rows.append(count(variant, args.size, args.train_batch if train else 0))
    text = markdown(rows, args.size, args.train_batch)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as out:
        out.write(text)
    print(text)
    return rows


if __name__ == "__main__":
    main()
