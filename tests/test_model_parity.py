"""SegNeXt in evaluation mode equals the reference (mmseg 1.2.2 MSCAN + LightHamHead) for every variant."""

import functools

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from oracle import REFERENCE_VARIANTS, build_reference, fix_reference_bases, reference_state_dict

from segnext_jax import models
from segnext_jax.serving.pytorch import load_state_dict

NUM_CLASSES = 19
RTOL = 1e-5


def reference_bases(batch: int, variant: str, seed: int) -> torch.Tensor:
    _, _, channels, rank = REFERENCE_VARIANTS[variant]
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.rand(batch, channels, rank, generator=generator), dim=1)


def relative_error(ours, reference) -> float:
    ours, reference = np.asarray(ours), np.asarray(reference)
    assert ours.shape == reference.shape
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


@nnx.jit
def eval_forward(model, images, bases):
    return model.backbone(images), model(images, nmf_bases=bases)


@functools.cache
def reference_pair(variant: str):
    """The reference backbone and head of `variant` in evaluation mode, and their state_dict (built once)."""
    backbone, head = build_reference(variant, NUM_CLASSES, seed=1)
    backbone.eval()
    head.eval()
    return backbone, head, reference_state_dict(backbone, head)


def check_eval_parity(variant: str, impl: str, shape: tuple[int, int, int]) -> None:
    backbone, head, state_dict = reference_pair(variant)
    model = models.create(variant, NUM_CLASSES, rngs=nnx.Rngs(0), depthwise_impl=impl)
    load_state_dict(model, state_dict)
    model.eval()
    images = np.random.RandomState(0).randn(*shape, 3).astype(np.float32)
    bases = reference_bases(shape[0], variant, seed=2)
    fix_reference_bases(head, bases)
    with torch.no_grad():
        ref_features = backbone(torch.from_numpy(images).permute(0, 3, 1, 2))
        ref_logits = head(ref_features).permute(0, 2, 3, 1).numpy()
    features, logits = eval_forward(model, jnp.asarray(images), jnp.asarray(bases.numpy()))
    h, w = shape[1:]
    assert logits.shape == (shape[0], -(-h // 8), -(-w // 8), NUM_CLASSES)
    errors = [relative_error(f, r.permute(0, 2, 3, 1).numpy()) for f, r in zip(features, ref_features)]
    errors.append(relative_error(logits, ref_logits))
    print(f"{variant} {impl} {shape}: max relative error per stage and logits {errors}")
    assert max(errors) <= RTOL


# 'native' on T and S only: B and L have S's channel counts (the kernels' only shape-dependent code paths), deeper.
@pytest.mark.parametrize(
    "variant,impl", [(v, i) for v in "tsbl" for i in ("shift_add", "xla")] + [("t", "native"), ("s", "native")]
)
def test_eval_matches_reference_odd_size_batch2(variant, impl):
    check_eval_parity(variant, impl, (2, 67, 93))


def test_eval_matches_reference_square_input():
    check_eval_parity("t", "shift_add", (1, 64, 64))
