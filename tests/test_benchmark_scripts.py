"""scripts/benchmark.py and scripts/count_flops.py run end to end on a tiny SegNeXt and write well-formed tables.

The tiny variant (depth 1 per stage, 8-16 channels) is registered for both sides (ours and the oracle's reference) so
that compiling stays short; timings are not asserted, only the structure of the output and that the numbers are
positive. The benchmark runs in evaluation mode only: compiling any training step takes minutes on 2 cores. Its
training side is covered by checking the reference optimiser's groups against ours; the FLOP counting by
hand-computed counts.
"""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import oracle
import pytest
import torch
from flax import nnx

from segnext_jax import models
from segnext_jax.training.optimizer import param_groups, reference_name

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import benchmark  # noqa: E402
import count_flops  # noqa: E402

TINY = "tiny"


@pytest.fixture
def tiny_variant(monkeypatch):
    monkeypatch.setitem(models.VARIANTS, TINY, models.Variant((8, 16, 16, 16), (1, 1, 1, 1), 0.1, 32, 4))
    monkeypatch.setitem(oracle.REFERENCE_VARIANTS, TINY, ([8, 16, 16, 16], [1, 1, 1, 1], 32, 4))


def test_benchmark_writes_markdown_and_json(tiny_variant, tmp_path):
    argv = ["--variants", TINY, "--modes", "eval", "--eval_batches", "2", "--sizes", "64x96", "--iters", "2"]
    argv += ["--depthwise_impl", "xla"]  # the quicker of the two to compile
    report = benchmark.main(argv + ["--output_dir", str(tmp_path), "--name", "smoke"])

    written = sorted(os.listdir(tmp_path))
    assert len(written) == 2 and written[0].endswith("_smoke.json") and written[1] == written[0][:-4] + "md"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d_[a-z0-9-]+_smoke\.json", written[0])
    with open(tmp_path / written[0]) as saved:
        assert json.load(saved) == json.loads(json.dumps(report))
    assert re.fullmatch(r"[0-9a-f]{40}", report["git"]["commit"])
    assert report["machine"]["versions"]["jax"] == jax.__version__ and report["machine"]["cores"] > 0
    assert report["settings"]["depthwise_impl_resolved"] == "xla"

    results = report["results"]
    assert [(r["variant"], r["mode"], r["batch"], r["height"], r["width"]) for r in results] == [
        (TINY, "eval", 2, 64, 96)
    ]
    for r in results:
        for side in ("ours", "reference"):
            numbers = r[side]
            assert len(numbers["latency_ms_all"]) == 2
            assert numbers["after_switch_ms"] > 0  # the untimed settling call of each turn
            assert numbers["latency_ms"] > 0 and numbers["cpu_s_per_call"] > 0 and numbers["first_call_s"] > 0
            assert numbers["images_per_s"] == pytest.approx(r["batch"] * 1e3 / numbers["latency_ms"])
            assert numbers["peak_mib"] >= 0
        assert r["ours"]["compile_s"] > 0
        assert r["speedup"] == pytest.approx(r["reference"]["latency_ms"] / r["ours"]["latency_ms"])

    table = (tmp_path / written[1]).read_text()
    rows = [line for line in table.splitlines() if line.startswith("| TINY |")]
    assert len(rows) == 1 and len(rows[0].split("|")) == 19
    assert report["machine"]["cpu"] in table
    assert "depthwise_impl xla (xla)" in table

    # --append adds to today's file of that name (scripts/device_check.sh runs its groups so); without, it restarts
    argv[argv.index("--eval_batches") + 1] = "1"
    benchmark.main(argv + ["--output_dir", str(tmp_path), "--name", "smoke", "--append"])
    with open(tmp_path / written[0]) as saved:
        assert [r["batch"] for r in json.load(saved)["results"]] == [2, 1]
    assert len((tmp_path / written[1]).read_text().split("| TINY |")) == 3
    benchmark.main(argv + ["--output_dir", str(tmp_path), "--name", "smoke"])
    with open(tmp_path / written[0]) as saved:
        assert [r["batch"] for r in json.load(saved)["results"]] == [1]
    assert sorted(os.listdir(tmp_path)) == written  # no temporary file left behind


def test_device_check_plans_the_gpu_benchmark():
    """scripts/device_check.sh's groups parse as benchmark.py flags and cover T and B evaluation at batch 1 and 16,
    512 x 512 and 768 x 1536, and their bfloat16 training step at batch 16."""
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "device_check.sh")
    result = subprocess.run(["bash", script, "--plan"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    planned = {line.removeprefix("plan: ") for line in result.stdout.splitlines() if line.startswith("plan: ")}
    expected = {
        repr(benchmark.Config(variant, "eval", batch, *size))
        for variant in "tb"
        for batch in (1, 16)
        for size in ((512, 512), (768, 1536))
    }
    expected |= {repr(benchmark.Config(variant, "train", 16, 512, 512)) for variant in "tb"}
    assert planned == expected


def test_count_flops_table(tiny_variant, tmp_path):
    output = tmp_path / "flops.md"
    (row,) = count_flops.main(["--variants", TINY, "--size", "64x64", "--output", str(output)])
    assert row["params"] == row["reference_params"] > 0  # the same architecture as mmseg's
    for impl in ("xla", "shift_add"):
        costs = row[f"eval_{impl}"]
        # 2 FLOPs per multiply-add plus the element-wise work
        assert costs["gflops"] > 2 * costs["gmacs"] > 0 and costs["gbytes"] > 0
    # the grouped convolutions are multiply-adds in the 'xla' form, element-wise products in the shift-add form
    assert row["eval_xla"]["gmacs"] > row["eval_shift_add"]["gmacs"]
    text = output.read_text()
    assert "| TINY | " in text and "paper GFLOPs" in text


def test_matmul_macs_counts_convolutions_products_and_scan_iterations():
    x = jnp.ones((2, 10, 12, 6))

    def program(x, w, dw, mats):
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        y = jax.lax.conv_general_dilated(
            y, dw, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=4
        )
        z = y.reshape(-1, 4)
        return jax.lax.scan(lambda c, m: (c @ m, None), z, mats)[0]

    w, dw, mats = jnp.ones((3, 3, 6, 4)), jnp.ones((5, 5, 1, 4)), jnp.ones((7, 4, 4))
    jaxpr = jax.make_jaxpr(program)(x, w, dw, mats).jaxpr
    pixels = 2 * 10 * 12
    expected = pixels * 4 * (3 * 3 * 6) + pixels * 4 * (5 * 5) + 7 * pixels * 4 * 4
    assert count_flops.matmul_macs(jaxpr) == expected

    products = jax.jit(lambda z, mats: jax.lax.scan(lambda c, m: (c @ m, None), z, mats)[0])
    with count_flops.unrolled_scans():
        flops = products.lower(jnp.ones((pixels, 4)), mats).compile().cost_analysis()["flops"]
    assert flops == 2 * 7 * pixels * 4 * 4


def test_reference_optimizer_has_our_parameter_groups():
    backbone, head = oracle.build_reference("t", benchmark.NUM_CLASSES, randomize=False)
    segmentor = torch.nn.ModuleDict({"backbone": backbone, "decode_head": head})
    optimizer = benchmark.reference_optimizer(segmentor)
    assert isinstance(optimizer, torch.optim.AdamW)
    names = {id(p): name for name, p in segmentor.named_parameters()}
    reference = {
        names[id(p)]: (group["lr"] / 6e-5, group["weight_decay"] / 0.01)
        for group in optimizer.param_groups
        for p in group["params"]
    }
    model = models.create("t", benchmark.NUM_CLASSES, rngs=nnx.Rngs(0))
    ours = {reference_name(name): groups for name, groups in param_groups(nnx.state(model, nnx.Param)).items()}
    assert reference.keys() == ours.keys()
    assert {name: pytest.approx(ours[name]) for name in ours} == reference
    assert {groups for groups in ours.values()} == {(10.0, 1.0), (1.0, 0.0), (1.0, 1.0)}
