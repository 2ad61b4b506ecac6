"""Training-mode SegNeXt equals the reference: logits, every parameter's gradient, BatchNorm running statistics."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from oracle import build_reference, fix_reference_bases, reference_state_dict

from segnext_jax import models
from segnext_jax.models.naming import path_to_key
from segnext_jax.serving.pytorch import export_state_dict, load_state_dict

NUM_CLASSES = 19
SHAPE = (2, 64, 96)
# A convolution bias directly before a training-mode BatchNorm has a true gradient of zero: compare it absolutely.
BIAS_BEFORE_BN = {
    "backbone.patch_embed1.proj.0.bias",
    "backbone.patch_embed1.proj.3.bias",
    "backbone.patch_embed2.proj.bias",
    "backbone.patch_embed3.proj.bias",
    "backbone.patch_embed4.proj.bias",
}


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@nnx.jit
def train_step_grads(model, images, labels, bases):
    def loss_fn(model):
        logits = model(images, nmf_bases=bases)
        return cross_entropy(logits, labels), logits

    (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    return loss, logits, grads


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.RandomState(0)
    images = rng.randn(*SHAPE, 3).astype(np.float32)
    labels = rng.randint(0, NUM_CLASSES, (SHAPE[0], SHAPE[1] // 8, SHAPE[2] // 8)).astype(np.int32)
    bases = F.normalize(torch.rand(SHAPE[0], 256, 16, generator=torch.Generator().manual_seed(3)), dim=1)
    return images, labels, bases


@pytest.fixture(scope="module")
def reference_step(inputs):
    """The reference's training forward and backward on T (stochastic depth and dropout off)."""
    images, labels, bases = inputs
    backbone, head = build_reference("t", NUM_CLASSES, seed=4)
    state_dict = reference_state_dict(backbone, head)
    backbone.train()
    head.train()
    fix_reference_bases(head, bases)
    logits = head(backbone(torch.from_numpy(images).permute(0, 3, 1, 2)))
    loss = F.cross_entropy(logits, torch.from_numpy(labels).long())
    loss.backward()
    grads = {"backbone." + k: p.grad.numpy() for k, p in backbone.named_parameters()}
    grads.update({"decode_head." + k: p.grad.numpy() for k, p in head.named_parameters()})
    after = reference_state_dict(backbone, head)
    return state_dict, loss.item(), logits.detach().permute(0, 2, 3, 1).numpy(), grads, after


def run_ours(state_dict, inputs, **model_kwargs):
    images, labels, bases = inputs
    model = models.create("t", NUM_CLASSES, rngs=nnx.Rngs(0), drop_path_rate=0.0, dropout_ratio=0.0, **model_kwargs)
    load_state_dict(model, state_dict)
    model.train()
    loss, logits, grads = train_step_grads(model, jnp.asarray(images), jnp.asarray(labels), jnp.asarray(bases.numpy()))
    named = {path_to_key(path): np.asarray(g.get_value()) for path, g in grads.flat_state()}
    return model, float(loss), np.asarray(logits), named


@pytest.fixture(scope="module", params=["native", "shift_add", "xla"])
def ours(request, reference_step, inputs):
    return run_ours(reference_step[0], inputs, depthwise_impl=request.param)


def test_training_logits_and_loss_match(reference_step, ours):
    _, ref_loss, ref_logits, _, _ = reference_step
    _, loss, logits, _ = ours
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    assert np.abs(logits - ref_logits).max() <= 1e-5 * np.abs(ref_logits).max()


def test_every_gradient_matches(reference_step, ours):
    _, _, _, ref_grads, _ = reference_step
    _, _, _, grads = ours
    assert set(grads) == set(ref_grads)
    worst = 0.0
    for key, ref in ref_grads.items():
        ours_ref_layout = np.transpose(grads[key], (3, 2, 0, 1)) if ref.ndim == 4 else grads[key]
        diff = np.abs(ours_ref_layout - ref).max()
        if key in BIAS_BEFORE_BN:
            assert diff <= 1e-6, key
        else:
            relative = diff / np.abs(ref).max()
            worst = max(worst, relative)
            assert relative <= 1e-4, (key, relative)
    print(f"largest relative gradient difference: {worst:.2e}")


def test_batchnorm_running_statistics_match_pytorch(reference_step, ours):
    _, _, _, _, after = reference_step
    model = ours[0]
    ours_after = export_state_dict(model)
    checked = 0
    for key, value in ours_after.items():
        if key.endswith(("running_mean", "running_var")):
            np.testing.assert_allclose(value, after[key], rtol=1e-5, atol=1e-6, err_msg=key)
            checked += 1
    assert checked == 2 * 31  # every BatchNorm of T: stem 2, patch embeds 3, blocks 13 x 2


@pytest.mark.parametrize("variant", ["t", "b"])
def test_one_step_gradient_same_forward_different_gradient(variant):
    """The HamNet / JSeg option stops the gradient before the final coefficient update: the decoder's output is
    unchanged, the gradient reaching `ham_in` (only through the NMF) is not."""
    rank = models.VARIANTS[variant].nmf_rank
    channels = models.VARIANTS[variant].head_channels
    in_channels = models.VARIANTS[variant].embed_dims[1:]
    rng = np.random.RandomState(5)
    features = [None] + [jnp.asarray(rng.randn(2, s, s, c).astype(np.float32)) for s, c in zip((8, 4, 2), in_channels)]
    bases = models.draw_nmf_bases(jax.random.key(0), 2, channels, rank)
    labels = jnp.asarray(rng.randint(0, NUM_CLASSES, (2, 8, 8)))

    def head_loss_and_grads(one_step_grad):
        head = models.LightHamHead(
            in_channels,
            channels,
            NUM_CLASSES,
            rank=rank,
            dropout_ratio=0.0,
            one_step_grad=one_step_grad,
            rngs=nnx.Rngs(0),
        )

        def loss_fn(head):
            logits = head(features, nmf_bases=bases)
            return cross_entropy(logits, labels), logits

        (_, logits), grads = nnx.jit(nnx.value_and_grad(loss_fn, has_aux=True))(head)
        return np.asarray(logits), np.asarray(grads["hamburger"]["ham_in"]["conv"]["kernel"].get_value())

    logits, grad = head_loss_and_grads(False)
    one_logits, one_grad = head_loss_and_grads(True)
    np.testing.assert_array_equal(one_logits, logits)
    assert np.abs(one_grad - grad).max() > 1e-3 * np.abs(grad).max()
