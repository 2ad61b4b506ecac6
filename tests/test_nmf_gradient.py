"""`nmf2d`'s hand-written backward pass (one matmul for the input's gradient) against JAX's automatic
differentiation of the same multiplicative updates written plainly, for every option and input dtype."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segnext_jax.models import draw_nmf_bases, nmf2d

HIGHEST = jax.lax.Precision.HIGHEST


def plain_nmf2d(x, bases, steps, inv_t, one_step_grad):
    """The updates as the reference writes them (mmseg `NMF2D`, transposed to (B, N, D)), left to autodiff."""
    x = x.astype(jnp.float32)

    def update_coef(bases, coef):
        numerator = jnp.einsum("bnd,bdr->bnr", x, bases, precision=HIGHEST)
        gram = jnp.einsum("bdr,bds->brs", bases, bases, precision=HIGHEST)
        return coef * numerator / (jnp.einsum("bnr,brs->bns", coef, gram, precision=HIGHEST) + 1e-6)

    def update_bases(bases, coef):
        numerator = jnp.einsum("bnd,bnr->bdr", x, coef, precision=HIGHEST)
        gram = jnp.einsum("bnr,bns->brs", coef, coef, precision=HIGHEST)
        return bases * numerator / (jnp.einsum("bdr,brs->bds", bases, gram, precision=HIGHEST) + 1e-6)

    coef = jax.nn.softmax(inv_t * jnp.einsum("bnd,bdr->bnr", x, bases, precision=HIGHEST), axis=-1)
    for _ in range(steps):
        coef = update_coef(bases, coef)
        bases = update_bases(bases, coef)
    if one_step_grad:
        bases, coef = jax.lax.stop_gradient(bases), jax.lax.stop_gradient(coef)
    coef = update_coef(bases, coef)
    return jnp.einsum("bdr,bnr->bnd", bases, coef, precision=HIGHEST)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("one_step_grad", [False, True])
@pytest.mark.parametrize("steps", [0, 3])
def test_gradients_equal_automatic_differentiation(dtype, one_step_grad, steps):
    keys = jax.random.split(jax.random.key(steps), 3)
    x = jax.random.uniform(keys[0], (2, 50, 24)).astype(dtype)
    bases = draw_nmf_bases(keys[1], 2, 24, 5)
    weights = jax.random.normal(keys[2], (2, 50, 24))
    inv_t = 2.0

    def ours(x, bases):
        return jnp.sum(weights * nmf2d(x, bases, steps, inv_t=inv_t, one_step_grad=one_step_grad))

    def plain(x, bases):
        return jnp.sum(weights * plain_nmf2d(x, bases, steps, inv_t, one_step_grad))

    value, (dx, dbases) = jax.value_and_grad(ours, argnums=(0, 1))(x, bases)
    plain_value, (plain_dx, plain_dbases) = jax.value_and_grad(plain, argnums=(0, 1))(x, bases)
    assert dx.dtype == dtype
    np.testing.assert_allclose(value, plain_value, rtol=1e-6)
    for ours_grad, plain_grad in ((dx, plain_dx), (dbases, plain_dbases)):
        scale = np.max(np.abs(np.asarray(plain_grad, np.float32)))
        assert scale > 0 or one_step_grad
        # both computed in float32; a bfloat16 x's gradient is then rounded to bfloat16 (one ulp: 2**-8 relative)
        tolerance = 1e-5 if ours_grad.dtype == jnp.float32 else 2**-7
        np.testing.assert_allclose(
            np.asarray(ours_grad, np.float32),
            np.asarray(plain_grad, np.float32),
            rtol=tolerance,
            atol=tolerance * scale,
        )
