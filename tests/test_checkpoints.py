"""segnext_jax.checkpoints: exact resume (model, optimiser, RNG, data position), retention, partial saves, models."""

import os
import signal
import subprocess
import sys
import textwrap

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from segnext_jax import checkpoints

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Tiny(nnx.Module):
    """Parameters, batch statistics and a dropout RNG stream: every kind of state a SegNeXt train state has."""

    def __init__(self, rngs: nnx.Rngs):
        self.dense = nnx.Linear(3, 4, rngs=rngs)
        self.norm = nnx.BatchNorm(4, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
        return self.dropout(self.norm(self.dense(x)))


def _pipeline():
    """A shuffled, randomly augmented grain pipeline: its position matters for what comes next."""
    dataset = (
        grain.MapDataset.range(40)
        .seed(7)
        .shuffle()
        .repeat()
        .random_map(lambda i, rng: (i + rng.uniform(size=3)).astype(np.float32))
        .batch(4)
    )
    return iter(dataset.to_iter_dataset())


def _fresh(seed):
    """State of a new model and its AdamW optimiser: {"model": ..., "optimizer": ...}, committed to one device as
    restored arrays are (so the jitted step is not compiled again for them)."""
    model = Tiny(nnx.Rngs(seed))
    state = nnx.state({"model": model, "optimizer": nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)})
    return jax.device_put(state, jax.devices()[0])


@pytest.fixture(scope="module")
def train():
    """`train(state, iterator, steps) -> state`: a jitted step compiled once (one graph definition for all states)."""
    model = Tiny(nnx.Rngs(0))
    graphdef, _ = nnx.split({"model": model, "optimizer": nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)})

    @jax.jit
    def step(state, x):
        objects = nnx.merge(graphdef, state)
        model, optimizer = objects["model"], objects["optimizer"]
        optimizer.update(model, nnx.grad(lambda m: jnp.mean((m(x) - 1.0) ** 2))(model))
        return nnx.state(objects)

    def run(state, iterator, steps):
        for _ in range(steps):
            state = step(state, jnp.asarray(next(iterator)))
        return state

    return run


def _assert_trees_equal(a, b):
    a, b = jax.tree.map(_key_data, a), jax.tree.map(_key_data, b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _key_data(leaf):
    """PRNG keys compare through their raw bits."""
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(leaf)
    return leaf


def test_resume_equals_uninterrupted_run(tmp_path, train):
    iterator = _pipeline()
    reference = train(_fresh(0), iterator, 5)
    reference_next_batch = next(iterator)

    iterator = _pipeline()
    state = train(_fresh(0), iterator, 3)
    manager = checkpoints.make_manager(str(tmp_path), keep=2)
    assert checkpoints.restore_latest(manager, state) is None
    assert checkpoints.save(manager, 3, state, iterator, force=True)
    manager.wait_until_finished()
    train(state, iterator, 1)  # progress after the checkpoint is lost with the "crash"

    iterator = _pipeline()  # a new process: other initial weights, a new pipeline at its start
    manager = checkpoints.make_manager(str(tmp_path), keep=2)
    step, state = checkpoints.restore_latest(manager, _fresh(1), iterator)
    assert step == 3
    _assert_trees_equal(train(state, iterator, 2), reference)
    np.testing.assert_array_equal(next(iterator), reference_next_batch)


def test_keeps_latest_n_and_best(tmp_path):
    manager = checkpoints.make_manager(str(tmp_path), keep=2, save_every=2)
    state = {"w": jnp.zeros(3)}
    saved = [checkpoints.save(manager, step, state) for step in range(1, 5)]
    assert saved == [True, True, False, True]  # first call, then every 2nd step
    assert checkpoints.save(manager, 5, state, metrics={"mIoU": 0.7, "aAcc": np.float32(0.9), "IoU": [0.5, 0.9]})
    assert checkpoints.save(manager, 7, state, metrics={"mIoU": 0.6})
    assert checkpoints.save(manager, 8, state)
    assert not checkpoints.save(manager, 8, state, force=True)  # a saved step is never rewritten
    manager.wait_until_finished()
    assert manager.all_steps() == [5, 7, 8]  # the latest two, plus the best
    assert manager.best_step() == 5
    assert manager.metadata(5).metrics == {"mIoU": 0.7, "aAcc": pytest.approx(0.9)}


def test_partial_checkpoint_of_killed_run_is_ignored(tmp_path):
    """kill -9 while a save is in flight: the restart resumes from the last complete step.

    The kill is injected at the worst moment, when step 2 is fully written and orbax is about to commit it (rename
    its temporary directory), so the test does not depend on timing.
    """
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {REPO!r})
        import jax.numpy as jnp
        from orbax.checkpoint._src.path import atomicity
        from segnext_jax import checkpoints
        manager = checkpoints.make_manager(sys.argv[1], keep=3)
        checkpoints.save(manager, 1, {{"w": jnp.ones((256, 256))}})
        manager.wait_until_finished()

        async def killed_before_commit(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)

        atomicity.AtomicRenameTemporaryPath.finalize = killed_before_commit
        checkpoints.save(manager, 2, {{"w": jnp.full((256, 256), 2.0)}}, force=True)
        manager.wait_until_finished()
        """
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True, check=False)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()[-2000:]
    assert any(name.startswith("2.") for name in os.listdir(tmp_path / "checkpoints")), "no partial step to ignore"

    manager = checkpoints.make_manager(str(tmp_path), keep=3)
    assert manager.all_steps() == [1]
    step, restored = checkpoints.restore_latest(manager, {"w": jnp.zeros((256, 256))})
    assert step == 1 and float(restored["w"].min()) == 1.0
    assert checkpoints.save(manager, 2, {"w": jnp.full((256, 256), 3.0)}, force=True)  # the step is saved anew
    manager.wait_until_finished()
    assert manager.all_steps() == [1, 2]
    assert float(checkpoints.restore_latest(manager, {"w": jnp.zeros((256, 256))})[1]["w"].max()) == 3.0


@pytest.fixture(scope="module")
def random_segnext():
    """`random_segnext(num_classes, seed)`: SegNeXt-T with random values everywhere, much faster than models.create.

    Built on the abstract model that checkpoints caches (tracing the constructor is the slow part of every test here).
    """

    def build(num_classes, seed):
        graphdef, state = checkpoints._abstract_model({"variant": "t", "num_classes": num_classes})
        rng = np.random.default_rng(seed)

        def fill(leaf):
            if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
                return jax.random.wrap_key_data(rng.integers(2**32, size=2, dtype=np.uint32))
            return rng.standard_normal(leaf.shape).astype(leaf.dtype)

        return nnx.merge(graphdef, jax.tree.map(fill, state))

    return build


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, random_segnext):
    model = random_segnext(5, seed=0)
    path = tmp_path_factory.mktemp("converted") / "segnext_t"
    checkpoints.save_model(model, str(path), {"model": {"variant": "t", "num_classes": 5}, "source": "test"})
    return model, path


def test_save_model_restore_model_round_trip(saved_model):
    model, path = saved_model
    restored = checkpoints.restore_model(str(path))
    _assert_trees_equal(nnx.state(restored), nnx.state(model))
    assert restored.num_classes == 5
    assert restored.backbone.block1[0].norm1.use_running_average  # eval mode


def test_save_model_never_overwrites_unasked(saved_model, random_segnext):
    model, path = saved_model
    other = random_segnext(5, seed=1)
    metadata = {"model": {"variant": "t", "num_classes": 5}}
    with pytest.raises(FileExistsError, match=str(path)):
        checkpoints.save_model(other, str(path), metadata)
    _assert_trees_equal(nnx.state(checkpoints.restore_model(str(path))), nnx.state(model))
    with pytest.raises(ValueError, match="do not match"):
        checkpoints.save_model(other, str(path.parent / "wrong"), {"model": {"variant": "t", "num_classes": 9}})
    assert not (path.parent / "wrong").exists()

    copy = path.parent / "copy"
    checkpoints.save_model(model, str(copy), metadata)
    checkpoints.save_model(other, str(copy), metadata, overwrite=True)
    _assert_trees_equal(nnx.state(checkpoints.restore_model(str(copy))), nnx.state(other))
    assert sorted(os.listdir(path.parent)) == ["copy", "segnext_t"]  # no partial directory left behind


def test_restore_model_from_training_workdir(tmp_path, random_segnext):
    metadata = {"model": {"variant": "t", "num_classes": 5}, "config": {"seed": 0}}
    manager = checkpoints.make_manager(str(tmp_path), keep=1, metadata=metadata)
    first, second = random_segnext(5, seed=2), random_segnext(5, seed=3)
    checkpoints.save(manager, 10, {"model": nnx.state(first), "step": 10}, metrics={"mIoU": 0.8})
    manager.wait_until_finished()
    with pytest.raises(FileNotFoundError, match=r"--step=11: no such checkpoint in .* \(saved steps: \[10\]\)"):
        checkpoints.restore_model(str(tmp_path), step=11)
    checkpoints.save(manager, 20, {"model": nnx.state(second), "step": 20}, force=True)
    manager.wait_until_finished()
    _assert_trees_equal(nnx.state(checkpoints.restore_model(str(tmp_path))), nnx.state(second))
    _assert_trees_equal(nnx.state(checkpoints.restore_model(str(tmp_path), step="best")), nnx.state(first))
    with pytest.raises(ValueError, match="num_classes=5"):
        checkpoints.make_manager(str(tmp_path), keep=1, metadata={"model": {"variant": "t", "num_classes": 6}})


def test_load_pretrained_backbone(saved_model, random_segnext):
    source, path = saved_model
    model = random_segnext(9, seed=4)
    head_before = nnx.state(model.decode_head)
    checkpoints.load_pretrained(model, str(path), "backbone")
    _assert_trees_equal(nnx.state(model.backbone, checkpoints.WEIGHTS), nnx.state(source.backbone, checkpoints.WEIGHTS))
    _assert_trees_equal(nnx.state(model.decode_head), head_before)
    with pytest.raises(ValueError, match="does not fit this model"):
        checkpoints.load_pretrained(model, str(path), "model")  # 5 classes saved, 9 here
    with pytest.raises(FileNotFoundError, match="weights_conversion"):
        checkpoints.load_pretrained(model, str(path.parent / "missing"), "backbone")
