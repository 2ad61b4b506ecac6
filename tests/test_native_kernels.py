"""The native CPU depth-wise kernels (C++ through the XLA FFI): equal to XLA's grouped convolution in value and in
every gradient, alone and fused with an input bias, a bias and GELU (as in the feed-forward), under sharding too; the
build's cache and errors; the fallback (of these and of the cross-entropy kernels, tested against mmseg in
test_loss.py) when they are turned off or do not build."""

import math
import os
import platform
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segnext_jax.kernels import build
from segnext_jax.kernels import depthwise as native_kernels
from segnext_jax.models import depthwise

# (N, H, W, C), kernel, padding: SegNeXt's kernels; channel counts that use the 4-vector blocks, single vectors and the
# scalar tail; padding smaller than k // 2 (a smaller output); outputs narrower than the kernel.
CASES = [
    ((2, 11, 13, 40), (5, 5), (2, 2)),
    ((1, 9, 23, 64), (1, 21), (0, 10)),
    ((2, 23, 6, 35), (21, 1), (10, 0)),
    ((1, 7, 8, 12), (1, 7), (0, 3)),
    ((2, 8, 7, 3), (7, 1), (3, 0)),
    ((1, 6, 9, 160), (3, 3), (1, 1)),
    ((2, 6, 7, 16), (3, 5), (0, 1)),
    ((1, 3, 4, 8), (11, 11), (5, 5)),
    # more channels than one register block (64 with AVX-512): tiles of 4 pixels in the interior, with 2- and
    # 1-vector channel blocks and the scalar tail
    ((2, 9, 14, 83), (3, 5), (1, 2)),
    ((1, 5, 19, 83), (1, 7), (0, 3)),
]


def relative_error(ours, reference) -> float:
    return float(jnp.max(jnp.abs(ours - reference)) / jnp.max(jnp.abs(reference)))


def value_and_grads(impl, fused, x, kernel, input_bias, bias, padding, cotangent):
    """The output and its VJP's gradients for x and kernel, and for both biases if `fused` (which adds GELU too)."""

    def conv(x, kernel, input_bias, bias):
        if not fused:
            return depthwise.depthwise_conv(x, kernel, padding, impl)
        return depthwise.depthwise_conv(x, kernel, padding, impl, bias=bias, input_bias=input_bias, gelu=True)

    y, vjp = jax.vjp(conv, x, kernel, input_bias, bias)
    grads = vjp(cotangent)
    return (y, *(grads if fused else grads[:2]))


def test_native_kernels_build_on_this_machine():
    assert native_kernels.unavailable_reason() is None
    assert depthwise.resolve_impl("auto") == "native"
    assert depthwise.resolve_impl("auto", jnp.bfloat16) == "shift_add"


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("shape,kernel_size,padding", CASES)
def test_native_and_shift_add_equal_xla_value_and_gradients(shape, kernel_size, padding, fused):
    rng = np.random.default_rng(sum(shape))
    x = jnp.asarray(rng.standard_normal(shape, np.float32))
    kernel = jnp.asarray(rng.standard_normal((*kernel_size, 1, shape[-1]), np.float32))
    input_bias, bias = (jnp.asarray(rng.standard_normal(shape[-1:], np.float32)) for _ in range(2))
    out_shape = jax.eval_shape(lambda x, k: depthwise.depthwise_conv_xla(x, k, padding), x, kernel).shape
    cotangent = jnp.asarray(rng.standard_normal(out_shape, np.float32))
    run = jax.jit(value_and_grads, static_argnums=(0, 1, 6))
    expected = run("xla", fused, x, kernel, input_bias, bias, padding, cotangent)
    names = ("output", "input gradient", "kernel gradient", "input bias gradient", "bias gradient")
    for impl in ("native", "shift_add"):
        ours = run(impl, fused, x, kernel, input_bias, bias, padding, cotangent)
        assert len(ours) == len(expected) == (5 if fused else 3)
        for name, value, reference in zip(names, ours, expected):
            assert value.shape == reference.shape
            assert relative_error(value, reference) <= 2e-6, (impl, name)
    if fused:  # the forward alone (inference) runs the GELU inside the kernel; under jax.vjp it is XLA's, on z
        fused_options = dict(bias=bias, input_bias=input_bias, gelu=True)
        forward = jax.jit(lambda x: depthwise.depthwise_conv(x, kernel, padding, "native", **fused_options))
        assert relative_error(forward(x), expected[0]) <= 2e-6


def test_fused_gelu_is_exact_gelu_to_float32_rounding():
    # GELU inside the kernel, PyTorch's 0.5 z (1 + erf(z / sqrt 2)) with an erf fit, against 0.5 z erfc(-z / sqrt 2)
    # in float64, over the range where erf saturates, on a 1x1 identity convolution; 37 channels run the vector and
    # the scalar code. The bound is absolute, relative to max(1, |z|): 1 + erf loses the negative tail to
    # cancellation, as in PyTorch's own GELU (3.3e-7 |z|) and XLA's erf (2.1e-7 |z|); ours peaks at 1.9e-7 |z|
    # near z = 5.
    z = np.linspace(-12.0, 12.0, 2 * 37 * 500, dtype=np.float32).reshape(1, 2, 500, 37)
    kernel = jnp.ones((1, 1, 1, 37), jnp.float32)
    ours = jax.jit(lambda x: depthwise.depthwise_conv(x, kernel, (0, 0), "native", gelu=True))(jnp.asarray(z))
    exact = np.vectorize(lambda v: 0.5 * v * math.erfc(-v / math.sqrt(2.0)))(z.astype(np.float64))
    ours = np.asarray(ours)
    assert np.max(np.abs(ours - exact) / np.maximum(1.0, np.abs(z))) <= 2.5e-7
    # from z = -1 up, before the cancellation, a relative error
    np.testing.assert_allclose(ours[z >= -1], exact[z >= -1], rtol=1e-6, atol=1e-30)
    assert np.all(ours[z < 0] <= 0) and np.all(ours[z > 0] > 0)  # no value of the wrong sign


def test_kernel_gradient_is_repeatable():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 64, 48, 32), np.float32))
    grad = jnp.asarray(rng.standard_normal((2, 64, 48, 32), np.float32))
    kernel_grad = jax.jit(lambda x, g: native_kernels.kernel_grad(x, g, (5, 5), (2, 2)))
    first, second = kernel_grad(x, grad), kernel_grad(x, grad)
    np.testing.assert_array_equal(np.asarray(first), np.asarray(second))


def test_native_under_a_batch_sharded_jit_equals_one_device():
    from jax.sharding import NamedSharding, PartitionSpec

    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((8, 12, 10, 24), np.float32))
    kernel = jnp.asarray(rng.standard_normal((5, 5, 1, 24), np.float32))
    input_bias, bias = (jnp.asarray(rng.standard_normal((24,), np.float32)) for _ in range(2))

    def loss(x, kernel, input_bias, bias):
        y = depthwise.depthwise_conv(x, kernel, (2, 2), "native", bias=bias, input_bias=input_bias, gelu=True)
        return jnp.sum(jnp.square(y))

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
    expected = grads(x, kernel, input_bias, bias)
    x_sharded = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
    sharded = grads(x_sharded, kernel, input_bias, bias)
    for ours, reference in zip(sharded, expected):
        assert relative_error(ours, reference) <= 1e-6
    # each device runs the kernels on its own image (batch 1 of 8), not on a gathered batch; the weight gradient's
    # per-device parts are summed
    program = grads.lower(x_sharded, kernel, input_bias, bias).compile().as_text()
    kernel_operands = re.findall(r"custom-call\((.*?)\), custom_call_target=\"segnext_depthwise", program)
    assert len(kernel_operands) == 3  # forward, input gradient, weight gradient
    assert "all-gather" not in program and "all-reduce" in program
    per_device = re.findall(r"f32\[(\d+),12,10,24\]", program)
    assert per_device and set(per_device) == {"1"}


def test_native_refuses_bfloat16():
    x = jnp.zeros((1, 4, 4, 8), jnp.bfloat16)
    with pytest.raises(ValueError, match="native.*float32"):
        depthwise.depthwise_conv(x, jnp.zeros((3, 3, 1, 8), jnp.bfloat16), (1, 1), "native")


def test_build_reuses_the_cached_library():
    library = build.build(native_kernels.LIBRARY)
    modified = library.stat().st_mtime_ns
    assert build.build(native_kernels.LIBRARY) == library
    assert library.stat().st_mtime_ns == modified
    assert library.parent == build.cache_dir()


def test_build_errors_name_the_cause(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGNEXT_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(build.BuildError, match="does not run.*set CXX"):
        build.build(native_kernels.LIBRARY)
    failing = tmp_path / "failing-compiler"
    failing.write_text("#!/bin/sh\necho 'error: this compiler always fails' >&2\nexit 1\n")
    failing.chmod(0o755)
    monkeypatch.setenv("CXX", str(failing))
    with pytest.raises(build.BuildError, match="this compiler always fails"):
        build.build(native_kernels.LIBRARY)
    assert not list((tmp_path / "cache").glob("*.so"))  # nothing half-written is left to load


FALLBACK = textwrap.dedent(
    """
    import jax.numpy as jnp
    from flax import nnx
    from segnext_jax import models
    from segnext_jax.models import depthwise
    from segnext_jax.training import loss
    assert depthwise.resolve_impl("auto") == "shift_add" and loss.resolve_impl("auto") == "xla"
    tiny = models.Variant((32, 32, 64, 64), (1, 1, 1, 1), 0.1, 64, 8)  # quick to compile
    model = models.create(tiny, 5, rngs=nnx.Rngs(0))
    model.eval()
    assert model(jnp.zeros((1, 32, 32, 3)), rngs=nnx.Rngs(0)).shape == (1, 4, 4, 5)
    try:
        depthwise.depthwise_conv(jnp.zeros((1, 4, 4, 8)), jnp.zeros((3, 3, 1, 8)), (1, 1), "native")
    except RuntimeError as error:
        print(error)
    """
)


def test_turned_off_kernels_fall_back_to_shift_add():
    env = {**os.environ, "SEGNEXT_JAX_NATIVE_KERNELS": "0", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", FALLBACK], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "unavailable: turned off by SEGNEXT_JAX_NATIVE_KERNELS=0" in result.stdout


def test_kernels_that_do_not_build_fall_back_with_a_warning(tmp_path):
    script = (
        "from segnext_jax.models import depthwise; from segnext_jax.training import loss; "
        "print(depthwise.resolve_impl('auto'), loss.resolve_impl('auto'))"
    )
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "SEGNEXT_JAX_CACHE": str(tmp_path / "cache")}
    env.pop("SEGNEXT_JAX_NATIVE_KERNELS", None)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "shift_add xla"
    assert "native CPU depth-wise kernels unavailable, using the slower shift_add form" in result.stderr
    assert "native CPU cross-entropy kernels unavailable, using XLA's loss" in result.stderr
    assert "no-such-compiler" in result.stderr


def test_kernels_built_for_another_target_pass_the_parity_tests(tmp_path):
    # SEGNEXT_JAX_KERNEL_FLAGS replaces -march=native: on an AVX-512 machine an AVX2 build (8 lanes: other register
    # blocks, tiles from 32 channels up) runs the depth-wise and cross-entropy parity tests of the 16-lane default;
    # elsewhere the compiler's baseline build does. Its own library, next to the default's in the cache.
    cpu_flags = build._cpu_identity()
    flags = "-march=x86-64-v3" if platform.machine() == "x86_64" and " avx2" in cpu_flags else ""
    env = {**os.environ, "SEGNEXT_JAX_KERNEL_FLAGS": flags, "SEGNEXT_JAX_CACHE": str(tmp_path)}
    env.pop("SEGNEXT_JAX_NATIVE_KERNELS", None)
    tests = ["tests/test_native_kernels.py", "tests/test_loss.py"]
    selection = "equal_xla or gelu or repeatable or native and mmseg or nan"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", *tests]
    command += ["-k", selection]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:]
    passed = re.search(r"\b(\d+) passed\b", result.stdout)
    assert passed and int(passed.group(1)) >= 20 and " failed" not in result.stdout, result.stdout[-500:]
    built = {path.name.split("-")[0] for path in tmp_path.glob("*.so")}
    assert built == {"depthwise_cpu", "cross_entropy_cpu"}
    assert not {path.name for path in tmp_path.glob("*.so")} & {path.name for path in build.cache_dir().glob("*.so")}
