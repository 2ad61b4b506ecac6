"""Ahead-of-time compilation for Cloud TPU from any host: HBM, FLOPs, bytes and a roofline before renting a pod.

With `jax[tpu]` installed (libtpu from PyPI: `pip install -e '.[tpu]'`), `jax.experimental.topologies` describes a
TPU slice such as `v5e:2x2` as compile-only devices on a machine without a TPU. `compile_report` compiles a
config's real training step (`training.train.train_step`, over a `data` mesh of those devices, batch sharded,
state replicated) or evaluation step (`evaluation.inference`'s network call on one chip, as evaluation runs on each
host's first device) with the real TPU compiler, from abstract shapes only: no dataset, no pretrained weights, no
array is allocated. It reports the compiler's figures per chip:
- HBM: the peak of live buffers against the chip's capacity, and its parts (`memory_analysis()`: arguments,
  outputs, temporaries). The peak is what must fit: the temporaries' size sums buffers that reuse memory over the
  step, and XLA:TPU compiles programs whose temporaries add up to more than the chip's HBM when the peak fits;
- FLOPs and bytes accessed per step (`cost_analysis()`), corrected for loops: XLA counts a while loop's body once,
  so each stage run as a `jax.lax.scan` (the backend policy scans every multi-block stage on TPU) adds its other
  blocks' cost, measured by compiling one block of that stage alone (fwd + bwd for training);
- a roofline: max(FLOPs / peak FLOP/s, bytes / HBM bandwidth) per step, and images per second per chip, with the
  peak figures used (Google's Cloud TPU documentation, per chip, bf16);
- the operations that move the most bytes (`largest_operations`, from segnext_jax.hlo_bytes), to find where a
  memory-bound step spends its time;
- compile time and the compiling process's peak host RAM;
- optionally the largest per-chip batch that compiles within HBM (`largest_batch_per_chip`, by bisection).

The program is traced under `backend.use(mesh)`, so every per-backend choice is TPU's (XLA convolutions and loss,
no CPU FFI kernel). Run it with JAX_PLATFORMS=cpu (or `use_host_cpu_only()` first) so that JAX does not look for
a TPU on the host; libtpu warns about TPU_ACCELERATOR_TYPE and worker hostnames, which is harmless here.

Host cost: compiling runs on about one CPU core for minutes per program at the recipe sizes, and takes several GiB
of RAM (`HOST_RAM_GIB`; `host_ram_note` says how much before compiling, the report how much it took).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import resource
import time
from collections import Counter
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from segnext_jax import backend, configuration, hlo_bytes, models, sharding
from segnext_jax.evaluation import inference
from segnext_jax.training import train

PROGRAMS = ("train", "eval")


@dataclasses.dataclass(frozen=True)
class Chip:
    """Per-chip peak figures of a Cloud TPU generation (Google's Cloud TPU documentation, system architecture)."""

    name: str
    peak_flops: float  # bf16 FLOP/s
    hbm_bandwidth: float  # bytes/s
    hbm_bytes: int
    megacore: bool  # two TensorCores per chip, compiled for as one device (chip_config_name='megacore')


CHIPS: dict[str, Chip] = {
    "v4": Chip("TPU v4", 275e12, 1200e9, 32 * 2**30, megacore=True),
    "v5e": Chip("TPU v5e", 197e12, 819e9, 16 * 2**30, megacore=False),
    "v5p": Chip("TPU v5p", 459e12, 2765e9, 95 * 2**30, megacore=True),
    "v6e": Chip("TPU v6e", 918e12, 1640e9, 32 * 2**30, megacore=False),
}

# Peak resident memory (GiB) of a process compiling a variant's program for v5e:2x2 at the ADE20K recipe (training:
# 512 x 512, 4 images per chip; evaluation: one 512 x 512 image), loop correction included, on x86-64 with jax
# 0.10.2 / libtpu 0.0.42.1, rounded up over float32 and bfloat16. Only measured variants are listed; larger ones need
# more.
HOST_RAM_GIB = {("t", "train"): 7.5, ("t", "eval"): 2.5, ("b", "train"): 9}


class CompileError(RuntimeError):
    """The program cannot be compiled for the topology here (libtpu missing, unknown topology); says what to do."""


def use_host_cpu_only() -> None:
    """Keeps JAX's own backends on the host CPU (the TPU devices come from the topology, compile-only). Call before
    any JAX computation; a no-op once backends are initialised with JAX_PLATFORMS set. Also lets several processes
    load libtpu at once (ALLOW_MULTIPLE_LIBTPU_LOAD): compiling claims no TPU, and libtpu's lock file would otherwise
    refuse a second compile on the host ("Internal error when accessing libtpu multi-process lockfile")."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if not os.environ.get("JAX_PLATFORMS"):
        jax.config.update("jax_platforms", "cpu")


def chip_of(topology: str) -> Chip:
    """The chip of a topology name such as 'v5e:2x2' (generation before the colon)."""
    generation = topology.split(":")[0].lower()
    if generation not in CHIPS:
        raise CompileError(f"topology {topology!r}: unknown TPU generation {generation!r}; known: {sorted(CHIPS)}")
    return CHIPS[generation]


def topology_mesh(topology: str) -> Mesh:
    """A 1-D `data` mesh (Auto axis, as sharding.make_mesh) over the compile-only devices of a Cloud TPU slice such
    as 'v5e:2x2', 'v5e:4x4', 'v4:2x2x1', 'v5p:2x2x1' or 'v6e:2x2': one device per chip."""
    from jax.experimental import topologies

    options = {"chip_config_name": "megacore"} if chip_of(topology).megacore else {}
    try:
        description = topologies.get_topology_desc(platform="tpu", topology_name=topology, **options)
    except RuntimeError as error:
        if "TPU support not installed" in str(error):
            raise CompileError("compiling for TPU needs libtpu: pip install -e '.[tpu]' (jax[tpu])") from error
        raise CompileError(f"topology {topology!r}: {error}") from error
    devices = np.array(description.devices)
    return Mesh(devices, (sharding.DATA_AXIS,), axis_types=(AxisType.Auto,))


def _resolved(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    configuration.check(config)
    return config.copy_and_resolve_references()


def _with_sharding(tree: Any, target: jax.sharding.Sharding) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=target), tree)


def abstract_model(config: ml_collections.ConfigDict) -> nnx.Module:
    """The config's model with shapes only (`nnx.eval_shape`): no parameter is allocated or initialised."""
    key = jax.random.key(config.seed)
    return nnx.eval_shape(lambda: configuration.create_model(config.model.to_dict(), rngs=nnx.Rngs(key)))


def abstract_train_state(
    config: ml_collections.ConfigDict, mesh: Mesh
) -> tuple[nnx.GraphDef, train.TrainState, train.Optimizer]:
    """`train.init_state`'s graph definition, state as shapes replicated over `mesh`, and optimiser, built with
    `nnx.eval_shape` (compile-only devices refuse concrete arrays; pretrained weights change no shape)."""
    model = abstract_model(config)
    graphdef, model_state = nnx.split(model)
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    optimizer = train.Optimizer(config, params)
    rng = jax.eval_shape(lambda: jax.random.split(jax.random.key(config.seed))[1])
    state = {"model": model_state, "opt_state": jax.eval_shape(optimizer.tx.init, params), "rng": rng}
    return graphdef, _with_sharding(state, sharding.replicated_sharding(mesh)), optimizer


def eval_input_size(config: ml_collections.ConfigDict) -> tuple[int, int]:
    """A network input (height, width) of evaluation: the sliding window, or in 'whole' mode a square image
    resized into config.data.test_scale (its short side) and padded to a multiple of 32."""
    if config.eval.mode == "slide":
        return tuple(config.eval.crop_size)
    side = -(-min(config.data.test_scale) // inference.SIZE_DIVISOR) * inference.SIZE_DIVISOR
    return side, side


def lower_train(
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    global_batch: int,
    image_size: tuple[int, int],
    *,
    target: backend.Target = None,
) -> jax.stages.Lowered:
    """`train.train_step` lowered for `mesh` at `global_batch` images of `image_size`, under the backend policy of
    `target` (default: the mesh's devices)."""
    graphdef, state, optimizer = abstract_train_state(config, mesh)
    data, replicated = sharding.data_sharding(mesh), sharding.replicated_sharding(mesh)
    h, w = image_size
    batch = {
        "image": jax.ShapeDtypeStruct((global_batch, h, w, 3), jnp.float32, sharding=data),
        "label": jax.ShapeDtypeStruct((global_batch, h, w), jnp.int32, sharding=data),
    }
    step = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    static = {"graphdef": graphdef, "optimizer": optimizer, "mesh": mesh}
    with backend.use(mesh if target is None else target):
        return train.train_step.lower(state, batch, step, **static)


def first_chip(mesh: Mesh) -> Mesh:
    """A `data` mesh of `mesh`'s first device: evaluation runs on each host's first device."""
    return Mesh(mesh.devices.flat[:1], (sharding.DATA_AXIS,), axis_types=(AxisType.Auto,))


def lower_eval(
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    batch: int,
    image_size: tuple[int, int],
    *,
    target: backend.Target = None,
) -> jax.stages.Lowered:
    """The evaluation network call (`inference._network_logits`: evaluation mode, logits resized to the input) on
    the mesh's first device, for `batch` images of `image_size`, under the backend policy of `target` (default:
    the mesh's devices)."""
    one_chip = first_chip(mesh)
    chip = NamedSharding(one_chip, PartitionSpec())
    model = abstract_model(config)
    graphdef, state = nnx.split(model)
    splits, dim, rank = inference.nmf_bases_shape(model)
    images = jax.ShapeDtypeStruct((batch, *image_size, 3), jnp.float32, sharding=chip)
    bases = jax.ShapeDtypeStruct((batch * splits, dim, rank), jnp.float32, sharding=chip)
    with backend.use(one_chip if target is None else target):
        return inference._network_logits.lower(graphdef, _with_sharding(state, chip), images, bases)


def _stage_sizes(image_size: tuple[int, int], num_stages: int) -> list[tuple[int, int]]:
    """Spatial size of each stage's blocks: stride 4 for the first (two stride-2 convolutions), then 2 per stage."""
    h, w = image_size
    sizes = []
    for stage in range(num_stages):
        for _ in range(2 if stage == 0 else 1):
            h, w = -(-h // 2), -(-w // 2)
        sizes.append((h, w))
    return sizes


def _block_cost(
    config: ml_collections.ConfigDict, mesh: Mesh, stage: int, batch: int, size: tuple[int, int], training: bool
) -> dict[str, float]:
    """FLOPs and bytes per chip of one block of `stage` compiled alone: forward and backward (input and parameter
    gradients, with stochastic depth) in training, forward in evaluation mode otherwise."""
    block = getattr(abstract_model(config).backbone, f"block{stage + 1}")[0]
    if not training:
        block.eval()
    graphdef, params, rest = nnx.split(block, nnx.Param, ...)
    dtype = models.DTYPES[config.model.dtype]
    shape = (batch, *size, configuration.architecture(config.model.variant).embed_dims[stage])
    target = sharding.data_sharding(mesh) if training else NamedSharding(mesh, PartitionSpec())
    x = jax.ShapeDtypeStruct(shape, dtype, sharding=target)
    replicated = NamedSharding(mesh, PartitionSpec())

    def forward(params, rest, x):
        return nnx.merge(graphdef, params, rest, copy=True)(x, rngs=jax.random.key(0) if training else None)

    def forward_backward(params, rest, x, cotangent):
        _, vjp = jax.vjp(lambda params, x: forward(params, rest, x), params, x)
        return vjp(cotangent)

    program = forward_backward if training else forward
    args = (_with_sharding(params, replicated), _with_sharding(rest, replicated), x) + ((x,) if training else ())
    with backend.use(mesh):
        cost = _cost(jax.jit(program).lower(*args).compile())
    return {"flops": cost.get("flops", 0.0), "bytes accessed": cost.get("bytes accessed", 0.0)}


def _cost(compiled: jax.stages.Compiled) -> dict[str, float]:
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    return dict(cost or {})


def while_trip_counts(hlo_text: str) -> list[int | None]:
    """Trip counts of the while loops of an optimised HLO module's text (None where the condition is not
    `counter < constant`), from each loop's condition computation."""
    computations = {}
    for match in re.finditer(r"^%?([\w.\-]+) \([^\n]*\{\n(.*?)^\}", hlo_text, re.M | re.S):
        computations[match.group(1)] = match.group(2)
    counts = []
    for condition in re.findall(r" while\([^\n]*?condition=%?([\w.\-]+)", hlo_text):
        constant = re.search(r"s32\[\][^\n=]* constant\((\d+)\)", computations.get(condition, ""))
        counts.append(int(constant.group(1)) if constant else None)
    return counts


def _scan_correction(
    config: ml_collections.ConfigDict, mesh: Mesh, program: str, batch: int, image_size: tuple[int, int]
) -> list[dict[str, Any]]:
    """Per scanned stage: its blocks, the while loops that run them (forward, and backward in training, per
    micro-step), and one block's cost per chip (`_block_cost`: the forward body plus the backward body)."""
    variant = configuration.architecture(config.model.variant)
    policy = backend.policy_for(mesh)
    training = program == "train"
    micro_steps = config.train.grad_accum_steps if training else 1
    stages = []
    for stage, (depth, size) in enumerate(zip(variant.depths, _stage_sizes(image_size, len(variant.depths)))):
        if depth > 1 and policy.scans(depth):
            cost = _block_cost(config, mesh, stage, batch // micro_steps, size, training)
            loops = micro_steps * (2 if training else 1)  # training: the forward scan and its transpose
            stages.append(
                {"stage": stage + 1, "blocks": depth, "loops": loops, "micro_steps": micro_steps, "block_cost": cost}
            )
    return stages


def analyse(
    compiled: jax.stages.Compiled,
    chip: Chip,
    images_per_chip: float,
    scanned_stages: list[dict[str, Any]],
) -> dict[str, Any]:
    """Memory, loop-corrected cost and roofline figures per chip of a compiled program (see the module docstring)."""
    memory = compiled.memory_analysis()
    peak = getattr(memory, "peak_memory_in_bytes", 0) or (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        + memory.temp_size_in_bytes
        - memory.alias_size_in_bytes
    )
    raw = _cost(compiled)
    flops, bytes_accessed = raw.get("flops", 0.0), raw.get("bytes accessed", 0.0)
    for stage in scanned_stages:  # each loop counted its body once: add the stage's other blocks, per micro-step
        extra = (stage["blocks"] - 1) * stage["micro_steps"]
        flops += extra * stage["block_cost"]["flops"]
        bytes_accessed += extra * stage["block_cost"]["bytes accessed"]
    compute_seconds, memory_seconds = flops / chip.peak_flops, bytes_accessed / chip.hbm_bandwidth
    step_seconds = max(compute_seconds, memory_seconds)
    hlo_text = compiled.as_text()
    trip_counts = while_trip_counts(hlo_text)
    expected = Counter()
    for stage in scanned_stages:
        expected[stage["blocks"]] += stage["loops"]
    matches = Counter(count for count in trip_counts if count is not None) == expected
    if not matches:
        logging.warning(
            "the program's while loops %s are not the scanned stages' %s: the loop-corrected FLOPs and "
            "bytes may be off",
            trip_counts,
            dict(expected),
        )
    return {
        "hbm_bytes_per_chip": int(peak),
        "hbm_capacity_bytes": chip.hbm_bytes,
        "hbm_fits": bool(peak <= chip.hbm_bytes),
        "hbm_breakdown_bytes": {
            "arguments": int(memory.argument_size_in_bytes),
            "outputs": int(memory.output_size_in_bytes),
            "temporaries": int(memory.temp_size_in_bytes),
            "aliased": int(memory.alias_size_in_bytes),
            "generated_code": int(memory.generated_code_size_in_bytes),
            "peak": int(peak),
        },
        "flops_per_chip": float(flops),
        "bytes_accessed_per_chip": float(bytes_accessed),
        "cost_analysis_uncorrected": {key: float(raw[key]) for key in ("flops", "bytes accessed") if key in raw},
        "scanned_stages": scanned_stages,
        "while_loop_trip_counts": trip_counts,
        "loop_correction_matches_program": matches,
        "peak_flops_per_second": chip.peak_flops,
        "hbm_bandwidth_bytes_per_second": chip.hbm_bandwidth,
        "roofline_compute_seconds": compute_seconds,
        "roofline_memory_seconds": memory_seconds,
        "roofline_bound": "memory" if memory_seconds >= compute_seconds else "compute",
        "estimated_step_seconds": step_seconds,
        "estimated_images_per_second_per_chip": images_per_chip / step_seconds if step_seconds else None,
        "largest_operations": _largest_operations(hlo_text),
    }


def _largest_operations(hlo_text: str, count: int = 12) -> list[dict[str, Any]]:
    """The operations that move the most bytes (segnext_jax.hlo_bytes), with their share of all operations'."""
    ops = hlo_bytes.operations(hlo_text)
    total = sum(op.bytes for op in ops) or 1.0
    return [
        {"bytes": op.bytes, "share": op.bytes / total, "trips": op.trips, "opcode": op.opcode, "shape": op.shape,
         "op_name": op.op_name}
        for op in ops[:count]
    ]  # fmt: skip


def _host_peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _available_host_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def host_ram_note(config: ml_collections.ConfigDict, program: str = "train") -> str:
    """One line: about how much host RAM compiling the config's `program` takes, and how much is free now."""
    variant = configuration.variant_name(config.model.variant)
    known = {v: gib for (v, p), gib in HOST_RAM_GIB.items() if p == program}
    needed = known.get(variant, max(known.values()))
    measured = ", ".join(f"SegNeXt-{v.upper()} {gib} GiB" for v, gib in known.items())
    amount = f"about {needed} GiB" if variant in known else f"an amount not measured yet ({measured})"
    available = _available_host_bytes()
    free = f"; {available / 2**30:.1f} GiB available now" if available is not None else ""
    warning = " (too little: close other programs)" if available is not None and available < needed * 2**30 else ""
    return f"compiling SegNeXt-{variant.upper()}'s {program} step needs {amount} of host RAM{free}{warning}"


def compile_program(
    config: ml_collections.ConfigDict,
    topology: str,
    program: str,
    *,
    global_batch: int | None = None,
    image_size: tuple[int, int] | None = None,
    correct_loops: bool = True,
) -> dict[str, Any]:
    """Compiles `program` ('train' or 'eval') of `config` for `topology` and returns its report (see
    `compile_report`, which also writes it). `global_batch` defaults to config.train.global_batch_size (train) or
    config.eval.batch_size (eval, one chip); `image_size` to config.data.crop_size (train) or `eval_input_size`."""
    if program not in PROGRAMS:
        raise ValueError(f"program={program!r}: choose one of {PROGRAMS}")
    config = _resolved(config)
    chip, mesh = chip_of(topology), topology_mesh(topology)
    devices = mesh.devices.size
    if program == "train":
        global_batch = global_batch or config.train.global_batch_size
        image_size = tuple(image_size or config.data.crop_size)
        micro = global_batch // config.train.grad_accum_steps
        if global_batch % config.train.grad_accum_steps or micro % devices:
            raise configuration.ConfigError(
                f"global batch {global_batch} must be a multiple of grad_accum_steps="
                f"{config.train.grad_accum_steps} x {devices} chips of {topology}"
            )
        chips, lower = devices, lambda: lower_train(config, mesh, global_batch, image_size)
    else:
        global_batch = global_batch or config.eval.batch_size
        image_size = tuple(image_size or eval_input_size(config))
        chips, lower = 1, lambda: lower_eval(config, mesh, global_batch, image_size)
    logging.info(
        "compiling the %s step of SegNeXt-%s for %s (%d x %s, %d images)",
        program,
        configuration.variant_name(config.model.variant).upper(),
        topology,
        *image_size,
        global_batch,
    )
    started = time.perf_counter()
    lowered = lower()
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    compiled_at = time.perf_counter()
    loop_mesh = mesh if program == "train" else first_chip(mesh)
    stages = _scan_correction(config, loop_mesh, program, global_batch, image_size) if correct_loops else []
    report = {
        "program": program,
        "topology": topology,
        "chip": chip.name,
        "chips": chips,
        "global_batch": global_batch,
        "images_per_chip": global_batch / chips,
        "image_size": list(image_size),
        "model": config.model.to_dict(),
        "policy": dataclasses.asdict(backend.policy_for(mesh)),
        "lower_seconds": lowered_at - started,
        "compile_seconds": compiled_at - lowered_at,
        **analyse(compiled, chip, global_batch / chips, stages),
        "host_peak_rss_bytes": _host_peak_rss_bytes(),
        "versions": {"jax": jax.__version__, "libtpu": _libtpu_version()},
    }
    return report


def _libtpu_version() -> str | None:
    from importlib import metadata

    for name in ("libtpu", "libtpu-nightly"):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def report_path(workdir: str, topology: str, program: str) -> str:
    """WORKDIR/compile/<topology>_<program>.json, e.g. v5e:2x2_train.json."""
    return os.path.join(workdir, "compile", f"{topology}_{program}.json")


def compile_report(
    config: ml_collections.ConfigDict,
    topology: str,
    program: str,
    workdir: str,
    *,
    global_batch: int | None = None,
    image_size: tuple[int, int] | None = None,
    find_max_batch: bool = False,
    correct_loops: bool = True,
) -> dict[str, Any]:
    """Compiles the config's `program` ('train' or 'eval') for the TPU `topology` (e.g. 'v5e:2x2') on this host and
    writes its report to `report_path(workdir, topology, program)`; returns it.

    Keys: program, topology, chip, chips, global_batch, images_per_chip, image_size, compile_seconds,
    hbm_bytes_per_chip (the peak of live buffers), hbm_capacity_bytes, hbm_fits, hbm_breakdown_bytes,
    flops_per_chip, bytes_accessed_per_chip (loop-corrected),
    peak_flops_per_second, hbm_bandwidth_bytes_per_second, estimated_step_seconds,
    estimated_images_per_second_per_chip, host_peak_rss_bytes, and with `find_max_batch`
    largest_batch_per_chip (several more compilations). `correct_loops=False` skips the loop correction (one
    compilation per scanned stage) and reports the compiler's uncorrected counts.
    """
    logging.info("%s", host_ram_note(config, program))
    report = compile_program(
        config, topology, program, global_batch=global_batch, image_size=image_size, correct_loops=correct_loops
    )
    if find_max_batch:
        report["largest_batch_per_chip"] = largest_batch_per_chip(
            config, topology, program, image_size=image_size, start=max(1, int(report["images_per_chip"]))
        )
    path = report_path(workdir, topology, program)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as file:
        json.dump(report, file, indent=2)
    os.replace(path + ".tmp", path)
    logging.info("%s", summary(report))
    logging.info("compile report: %s", path)
    return report


def _fits(config, topology, program, per_chip, image_size) -> bool:
    chips = 1 if program == "eval" else topology_mesh(topology).devices.size
    try:
        report = compile_program(
            config, topology, program, global_batch=per_chip * chips, image_size=image_size, correct_loops=False
        )
    except jax.errors.JaxRuntimeError as error:
        if "RESOURCE_EXHAUSTED" in str(error):
            return False
        raise
    return report["hbm_fits"]


def largest_batch_per_chip(
    config: ml_collections.ConfigDict,
    topology: str,
    program: str,
    *,
    image_size: tuple[int, int] | None = None,
    start: int = 1,
    limit: int = 256,
) -> int:
    """The largest number of images per chip whose program compiles within the chip's HBM (0 if none), found by
    doubling from `start` and then bisecting: each try is a full compilation. Training keeps
    config.train.grad_accum_steps, so per-chip batches are multiples of it."""
    step = config.train.grad_accum_steps if program == "train" else 1
    low, high = 0, None  # low fits (0: nothing known), high does not
    size = max(step, start - start % step)
    while high is None and size <= limit:
        if _fits(config, topology, program, size, image_size):
            low, size = size, size * 2
        else:
            high = size
    high = high or limit + step
    while high - low > step:
        middle = (low + high) // 2 // step * step
        if middle <= low:
            break
        if _fits(config, topology, program, middle, image_size):
            low = middle
        else:
            high = middle
    return low


def summary(report: dict[str, Any]) -> str:
    """A few lines for people: memory, cost, roofline, compile time."""
    gib = 2**30
    lines = [
        f"{report['program']} step of {report['global_batch']} images of {report['image_size'][0]}x"
        f"{report['image_size'][1]} on {report['topology']} ({report['chips']} chip(s), {report['chip']}): "
        f"compiled in {report['compile_seconds']:.0f} s",
        f"  HBM per chip: peak {report['hbm_bytes_per_chip'] / gib:.2f} GiB of {report['hbm_capacity_bytes'] / gib:.0f}"
        f" GiB (arguments {report['hbm_breakdown_bytes']['arguments'] / gib:.2f}, outputs "
        f"{report['hbm_breakdown_bytes']['outputs'] / gib:.2f}, temporaries summed "
        f"{report['hbm_breakdown_bytes']['temporaries'] / gib:.2f})",
        f"  per chip per step: {report['flops_per_chip'] / 1e9:.1f} GFLOP, "
        f"{report['bytes_accessed_per_chip'] / 1e9:.1f} GB accessed",
        f"  roofline at {report['peak_flops_per_second'] / 1e12:.0f} TFLOP/s and "
        f"{report['hbm_bandwidth_bytes_per_second'] / 1e9:.0f} GB/s: {report['estimated_step_seconds'] * 1e3:.1f} ms "
        f"per step ({report['roofline_bound']}-bound), {report['estimated_images_per_second_per_chip']:.1f} images/s "
        "per chip at best",
        f"  host RAM peak {report['host_peak_rss_bytes'] / gib:.1f} GiB",
    ]
    for op in report.get("largest_operations", [])[:3]:
        lines.append(f"  {op['share']:5.1%} of the bytes: {op['opcode']} {op['shape'][:60]} from {op['op_name'][-70:]}")
    if "largest_batch_per_chip" in report:
        lines.append(f"  largest batch per chip that fits: {report['largest_batch_per_chip']}")
    return "\n".join(lines)
