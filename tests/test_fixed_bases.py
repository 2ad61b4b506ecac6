"""models.create(..., nmf_bases='fixed'): stored NMF bases make every call deterministic without seeds, equal the
reference's computation with those bases passed explicitly, stay out of the optimiser, and survive checkpoints and the
PyTorch converter."""

import dataclasses
import os
import runpy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from segnext_jax import checkpoints, configuration, models
from segnext_jax.models.ham_head import NMFBases
from segnext_jax.training import train
from weights_conversion import save_pytorch_checkpoint
from weights_conversion.__main__ import main as convert

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = models.Variant((32, 32, 64, 64), (1, 1, 1, 1), 0.1, 64, 8)
KWARGS = {"variant": dataclasses.asdict(TINY), "num_classes": 5, "depthwise_impl": "xla"}  # a config.model section
BASES_SHAPE = (1, 64, 8)  # (S, D, R) of the tiny variant


def create(rngs: nnx.Rngs, **options) -> models.SegNeXt:
    return configuration.create_model({**KWARGS, **options}, rngs=rngs)


@pytest.fixture(scope="module")
def fixed_model():
    model = create(nnx.Rngs(4), nmf_bases="fixed")
    model.eval()
    return model


@pytest.fixture(scope="module")
def random_model():
    model = create(nnx.Rngs(4))
    model.eval()
    return model


@nnx.jit
def logits(model, images):
    return model(images)


@nnx.jit
def logits_with_bases(model, images, bases):
    return model(images, nmf_bases=bases)


def images(batch: int = 2) -> jax.Array:
    return jnp.asarray(np.random.RandomState(0).randn(batch, 32, 32, 3).astype(np.float32))


def bases_of(model) -> np.ndarray:
    return np.asarray(model.decode_head.hamburger.ham.fixed_bases[...])


def param_leaves(model) -> list[np.ndarray]:
    return [np.asarray(leaf) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))]


def assert_same_params(model, other) -> None:
    for a, b in zip(param_leaves(model), param_leaves(other), strict=True):
        np.testing.assert_array_equal(a, b)


def paths_naming_bases(state: nnx.State) -> list[tuple]:
    return [path for path, _ in state.flat_state() if "fixed_bases" in map(str, path)]


def test_fixed_bases_make_calls_deterministic_and_equal_explicit_bases(fixed_model, random_model):
    """Same rngs, same weights: the fixed model's calls (no rngs given) are the random model's with its bases."""
    x = images()
    first, second = logits(fixed_model, x), logits(fixed_model, x)
    np.testing.assert_array_equal(first, second)
    assert not np.allclose(logits(random_model, x), logits(random_model, x), atol=1e-4)  # the reference's draws

    stored = fixed_model.fixed_nmf_bases(2)
    assert stored.shape == (2 * BASES_SHAPE[0], *BASES_SHAPE[1:])
    np.testing.assert_array_equal(stored[0], stored[1])  # every image starts from the same bases
    np.testing.assert_allclose(first, logits_with_bases(random_model, x, stored), rtol=1e-6, atol=1e-6)
    assert_same_params(fixed_model, random_model)
    assert random_model.fixed_nmf_bases(2) is None


def test_bases_from_a_seed_are_the_uniform_normalised_draw(fixed_model):
    seeded = create(nnx.Rngs(9), nmf_bases="fixed", nmf_seed=3)
    expected = models.draw_nmf_bases(jax.random.key(3), 1, BASES_SHAPE[1], BASES_SHAPE[2], BASES_SHAPE[0])
    np.testing.assert_array_equal(bases_of(seeded), expected)
    np.testing.assert_allclose(np.linalg.norm(bases_of(seeded), axis=1), 1.0, rtol=1e-6)  # columns over D
    assert not np.allclose(bases_of(seeded), bases_of(fixed_model))  # without a seed: from the model's rngs
    with pytest.raises(ValueError, match="nmf_bases='sometimes': choose one of random, fixed"):
        create(nnx.Rngs(0), nmf_bases="sometimes")


def test_the_optimiser_never_sees_the_bases(fixed_model):
    """Not an nnx.Param: not among the parameters that the training's optimiser and nnx.Optimizer (wrt=nnx.Param) get,
    so no optimiser state and no update; an nnx.Param would be in all of them."""
    params = nnx.state(fixed_model, nnx.Param)
    assert paths_naming_bases(params) == []
    assert paths_naming_bases(nnx.state(fixed_model, NMFBases)) == [("decode_head", "hamburger", "ham", "fixed_bases")]
    config = runpy.run_path(os.path.join(REPO, "configs", "demo.py"))["get_config"]()
    optimizer = nnx.Optimizer(nnx.clone(fixed_model), train.Optimizer(config, params).tx, wrt=nnx.Param)
    optimizer_paths = [path for path, _ in nnx.state(optimizer).flat_state()]
    assert any("conv_seg" in map(str, path) for path in optimizer_paths)  # its state is keyed by parameter paths
    assert paths_naming_bases(nnx.state(optimizer)) == []


def test_checkpoint_round_trip_needs_the_option_recorded(fixed_model, tmp_path):
    metadata = {"model": {**KWARGS, "nmf_bases": "fixed"}}
    checkpoints.save_model(fixed_model, str(tmp_path / "model"), metadata)
    restored = checkpoints.restore_model(str(tmp_path / "model"))
    np.testing.assert_array_equal(bases_of(restored), bases_of(fixed_model))
    np.testing.assert_array_equal(logits(restored, images()), logits(fixed_model, images()))
    with pytest.raises(ValueError, match="do not match metadata"):  # kwargs without the option build no bases
        checkpoints.save_model(fixed_model, str(tmp_path / "other"), {"model": KWARGS})


def test_converter_gives_a_pth_fixed_bases(random_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(models.VARIANTS, "tiny", TINY)  # the converter recognises registered variants only
    pth = str(tmp_path / "tiny.pth")
    save_pytorch_checkpoint(random_model, pth)
    assert convert([pth, str(tmp_path / "fixed"), "--nmf-bases=fixed:5"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("fixed NMF bases of seed 5")
    restored = checkpoints.restore_model(str(tmp_path / "fixed"))
    expected = models.draw_nmf_bases(jax.random.key(5), 1, BASES_SHAPE[1], BASES_SHAPE[2], BASES_SHAPE[0])
    np.testing.assert_array_equal(bases_of(restored), expected)
    assert_same_params(restored, random_model)

    assert convert([pth, str(tmp_path / "default")]) == 0
    assert checkpoints.restore_model(str(tmp_path / "default")).fixed_nmf_bases(1) is None
    for bad in ("fixed:x", "fixed:-1", "seed:1"):
        with pytest.raises(SystemExit):
            convert([pth, str(tmp_path / "bad"), f"--nmf-bases={bad}"])
        assert "give random, fixed or fixed:SEED" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "bad")
