"""Side-by-side speed of this project and the PyTorch reference (MMSegmentation 1.2.2), in one process.

Usage: python scripts/benchmark.py [--variants=t,b] [--modes=eval,train] [--eval_batches=1] [--sizes=512x512]
           [--train_batch=2] [--train_size=512x512] [--iters=5] [--warmup=1] [--settle=1] [--threads=2]
           [--dtype=float32]
           [--output_dir=benchmarks] [--name=] [--append]

For every configuration both sides are built, warmed up, then timed ALTERNATELY (ours, reference, ours, ...) so that
both see the same background load; the medians are reported. Each turn of a side starts with `--settle` untimed calls
(default 1), so that a timed call follows a call of the same program, as steps do in a training loop: the first call
after the other side's is slower for both (by up to 1.7x; benchmarks/README.md), as memory the other side has just
freed is faulted in again. Its time is reported as "after switch".

Run as a script, it restarts itself with huge pages for glibc's malloc (segnext_jax.malloc), as
`python -m segnext_jax.main` does, for both sides; SEGNEXT_JAX_HUGE_PAGES=0 measures without. Measured:
- eval: the forward pass of the segmentor in evaluation mode (logits at stride 8; ours jitted, the reference under
  torch.no_grad);
- train: one full training step: forward in training mode (drop path, dropout, 6 NMF steps), cross-entropy on the
  logits upsampled to the full label size (ignore 255, averaged over all pixels), backward, AdamW with the
  reference's parameter groups. Ours: a jitted step with `make_optimizer` (the model/optimizer state donated); the
  reference: `head.loss_decode` on mmseg's `resize` of the logits (mmseg's `loss_by_feat` without its accuracy
  metric) and torch.optim.AdamW built by mmengine's DefaultOptimWrapperConstructor with the SegNeXt custom_keys.
Columns: median latency per call, images/s, compile time (ours: `lower().compile()`), first call (the reference's
eager warm-up), peak memory, CPU seconds per call, and the 1-minute load average before and after.

Peak memory: on an accelerator, ours is XLA's footprint of the compiled program (arguments + outputs + temporaries,
from `memory_analysis()`; the device's `peak_bytes_in_use` cannot be reset between configurations) and the
reference's `torch.cuda.max_memory_allocated`; on CPU both are the growth of the process's resident memory during one
extra call after the timed ones (peak RSS, reset through /proc/self/clear_refs, minus the RSS before the call, glibc's
free memory first returned with malloc_trim): the activations and temporaries, not the parameters and optimiser
state, which are resident before.

Threads: `--threads N` restricts the process to N CPUs with `os.sched_setaffinity` (what `taskset -c` does) before
JAX creates its CPU client, which sizes its thread pools from that mask, and sets `torch.set_num_threads(N)`.
There is no XLA flag for the intra-op thread count (`intra_op_parallelism_threads` is TensorFlow's option, and
XLA_FLAGS rejects unknown flags); `--xla_cpu_multi_thread_eigen=true` is XLA's default.

With `--dtype=bfloat16` ours computes in bfloat16 and the reference runs under `torch.autocast(dtype=bfloat16)`.
On a GPU the reference runs on CUDA when torch has it (the environment's torch is CPU-only).
Writes benchmarks/<date>_<machine>[_<name>].md and .json (machine, versions, date, git commit, settings, results)
after every configuration; `--append` keeps the results already in today's files of that name and adds to them.
"""

from __future__ import annotations

# Both sides run with huge pages for malloc, as `python -m segnext_jax.main` does: restarted before the imports below
# (jax, torch, mmseg: seconds), which the restarted process would otherwise pay for twice.
if __name__ == "__main__":
    from segnext_jax import malloc

    malloc.restart_with_huge_pages()

import argparse
import ctypes
import datetime
import gc
import itertools
import json
import logging
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import flax
import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from segnext_jax import malloc, models
from segnext_jax.models import depthwise
from segnext_jax.training.loss import segmentation_loss
from segnext_jax.training.optimizer import SEGNEXT_CUSTOM_KEYS, make_optimizer
from segnext_jax.training.schedule import make_schedule

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
from oracle import build_reference, import_mmseg  # the reference, imported as the tests do

NUM_CLASSES = 150
IGNORE_INDEX = 255
MIB = 2**20


@dataclass
class Side:
    """Measurements of one implementation on one configuration."""

    latency_s: list[float] = field(default_factory=list)
    after_switch_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    peak_bytes: int = 0
    compile_s: float | None = None
    first_call_s: float | None = None

    def summary(self, batch: int) -> dict:
        median = statistics.median(self.latency_s)
        return {
            "latency_ms": 1e3 * median,
            "latency_ms_min": 1e3 * min(self.latency_s),
            "latency_ms_all": [1e3 * t for t in self.latency_s],
            "after_switch_ms": 1e3 * statistics.median(self.after_switch_s) if self.after_switch_s else None,
            "images_per_s": batch / median,
            "cpu_s_per_call": statistics.median(self.cpu_s),
            "peak_mib": self.peak_bytes / MIB,
            "compile_s": self.compile_s,
            "first_call_s": self.first_call_s,
        }


@dataclass(frozen=True)
class Config:
    variant: str
    mode: str
    batch: int
    height: int
    width: int


# ------------------------------------------------------------------------------------------------------------ ours
def ours_program(config: Config, *, dtype: str, depthwise_impl: str, seed: int = 0) -> tuple[Callable, tuple]:
    """Our jitted eval forward `(state, images, key) -> logits` or training step
    `(state, images, labels, key) -> (state, loss)` (state donated), and its first arguments."""
    train = config.mode == "train"
    model = models.create(config.variant, NUM_CLASSES, rngs=nnx.Rngs(seed), dtype=dtype, depthwise_impl=depthwise_impl)
    images, labels = random_batch(config, seed)
    key = jax.random.key(seed)
    if not train:
        model.eval()
        graphdef, state = nnx.split(model)

        def forward(state, images, key):
            return nnx.merge(graphdef, state)(images, rngs=nnx.Rngs(key))

        return jax.jit(forward), (state, jnp.asarray(images), key)

    tx = make_optimizer(nnx.state(model, nnx.Param), schedule=make_schedule(160000))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))

    def train_step(state, images, labels, key):
        model, optimizer = nnx.merge(graphdef, state)

        def loss_fn(model):
            return segmentation_loss(model(images, rngs=nnx.Rngs(key)), labels, IGNORE_INDEX)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss

    return jax.jit(train_step, donate_argnums=0), (state, jnp.asarray(images), jnp.asarray(labels), key)


def ours_runner(config: Config, side: Side, *, dtype: str, depthwise_impl: str) -> Callable[[], int | None]:
    """Compiles our program (timing it into `side.compile_s`) and returns a blocking call.

    The call returns XLA's footprint of the program on an accelerator, None on CPU."""
    fn, args = ours_program(config, dtype=dtype, depthwise_impl=depthwise_impl)
    start = time.perf_counter()
    compiled = fn.lower(*args).compile()
    side.compile_s = time.perf_counter() - start
    footprint = None
    if jax.default_backend() != "cpu":
        stats = compiled.memory_analysis()
        footprint = (
            stats.argument_size_in_bytes
            + stats.output_size_in_bytes
            - stats.alias_size_in_bytes
            + stats.temp_size_in_bytes
        )
    keys = itertools.cycle([jax.random.key(i) for i in range(8)])
    state, *inputs = args[:-1]
    holder = [state]

    def call() -> int | None:
        if config.mode == "train":
            holder[0], loss = compiled(holder[0], *inputs, next(keys))
            loss.block_until_ready()
        else:
            compiled(holder[0], *inputs, next(keys)).block_until_ready()
        return footprint

    return call


# ------------------------------------------------------------------------------------------------------- reference
def reference_optimizer(segmentor: torch.nn.Module) -> torch.optim.Optimizer:
    """torch.optim.AdamW with the SegNeXt config's parameter groups, built as mmengine builds it."""
    import_mmseg()
    from mmengine.logging import MMLogger
    from mmengine.optim import DefaultOptimWrapperConstructor

    constructor = DefaultOptimWrapperConstructor(
        dict(type="OptimWrapper", optimizer=dict(type="AdamW", lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01)),
        dict(custom_keys={key: dict(options) for key, options in SEGNEXT_CUSTOM_KEYS.items()}),
    )
    MMLogger.get_current_instance().setLevel(logging.WARNING)  # one INFO line per parameter otherwise
    return constructor(segmentor).optimizer


def reference_runner(config: Config, *, dtype: str) -> Callable[[], int | None]:
    """The reference's eval forward or training step as a blocking call (peak CUDA bytes on a GPU, else None)."""
    import_mmseg()
    from mmseg.models.utils import resize

    train = config.mode == "train"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    variant = models.VARIANTS[config.variant]
    backbone, head = build_reference(
        config.variant,
        NUM_CLASSES,
        drop_path_rate=variant.drop_path_rate if train else 0.0,
        dropout_ratio=0.1 if train else 0.0,
        randomize=False,
    )
    segmentor = torch.nn.ModuleDict({"backbone": backbone, "decode_head": head}).to(device)
    segmentor.train(train)
    images, labels = random_batch(config, seed=0)
    images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)
    labels = torch.from_numpy(labels).long().to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    optimizer = reference_optimizer(segmentor) if train else None

    def step() -> None:
        if not train:
            with torch.no_grad(), autocast:
                head(backbone(images))
            return
        optimizer.zero_grad()
        with autocast:
            logits = resize(head(backbone(images)), size=labels.shape[1:], mode="bilinear", align_corners=False)
            loss = head.loss_decode(logits, labels, weight=None, ignore_index=IGNORE_INDEX)
        loss.backward()
        optimizer.step()

    def call() -> int | None:
        if device.type != "cuda":
            step()
            return None
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()

    return call


# ----------------------------------------------------------------------------------------------------- measurement
def random_batch(config: Config, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised-looking NHWC float32 images and int32 labels (about 5% ignored) of the configuration's size."""
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((config.batch, config.height, config.width, 3), np.float32)
    labels = rng.integers(0, NUM_CLASSES, (config.batch, config.height, config.width), np.int32)
    labels[rng.random(labels.shape) < 0.05] = IGNORE_INDEX
    return images, labels


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as status:
        match = re.search(rf"^{field_name}:\s+(\d+) kB", status.read(), re.MULTILINE)
    return int(match.group(1))


def timed(call: Callable[[], int | None]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    call()
    return time.perf_counter() - wall, time.process_time() - cpu


def peak_memory(call: Callable[[], int | None]) -> int:
    """Peak bytes of one call: what the call reports (accelerator memory), else the growth of the peak resident memory
    over the resident memory before the call, after glibc has returned its free memory to the system (malloc_trim)
    so that memory kept from earlier calls (torch's heap keeps freed blocks) is counted again."""
    ctypes.CDLL(None).malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM (peak RSS) to the current RSS
    rss_before = _status_kib("VmRSS")
    device_peak = call()
    return device_peak if device_peak is not None else 1024 * max(0, _status_kib("VmHWM") - rss_before)


def run_config(config: Config, args: argparse.Namespace) -> dict:
    """Builds both sides, warms them up, times them alternately `args.iters` times (each turn after `args.settle`
    untimed calls), then measures their memory."""
    load_before = os.getloadavg()[0]
    ours, reference = Side(), Side()
    calls = {
        "ours": (ours, ours_runner(config, ours, dtype=args.dtype, depthwise_impl=args.depthwise_impl)),
        "reference": (reference, reference_runner(config, dtype=args.dtype)),
    }
    for side, call in calls.values():
        side.first_call_s = timed(call)[0]
        for _ in range(args.warmup - 1):
            call()
    for _ in range(args.iters):
        for side, call in calls.values():
            for settle in range(args.settle):
                wall = timed(call)[0]
                if settle == 0:
                    side.after_switch_s.append(wall)
            wall, cpu = timed(call)
            side.latency_s.append(wall)
            side.cpu_s.append(cpu)
    for side, call in calls.values():
        side.peak_bytes = peak_memory(call)  # one more call each, untimed
    result = {
        **asdict(config),
        "ours": ours.summary(config.batch),
        "reference": reference.summary(config.batch),
        "load_avg_before": load_before,
        "load_avg_after": os.getloadavg()[0],
    }
    result["speedup"] = result["reference"]["latency_ms"] / result["ours"]["latency_ms"]
    del calls
    gc.collect()
    return result


# --------------------------------------------------------------------------------------------------------- machine
def _run(command: list[str]) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True, check=True, cwd=REPO).stdout.rstrip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def describe_machine() -> dict:
    """CPU model, cores, memory, accelerators and software versions."""
    cpuinfo = open("/proc/cpuinfo").read()

    def first(key: str) -> str:
        match = re.search(rf"^{key}\s*:\s*(.*)$", cpuinfo, re.MULTILINE)
        return match.group(1).strip() if match else "?"

    flags = first("flags").split()
    mmseg = import_mmseg()
    return {
        "cpu": f"{first('model name')} (family {first('cpu family')}, model {first('model')})",
        "cpu_mhz": float(first("cpu MHz")) if first("cpu MHz") != "?" else None,
        "simd": [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags],
        "cores": os.cpu_count(),
        "cores_used": len(os.sched_getaffinity(0)),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "jax_backend": jax.default_backend(),
        "jax_devices": [d.device_kind for d in jax.devices()],
        "nvidia_smi": _run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]),
        "torch_device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "versions": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "jaxlib": jax.lib.__version__,
            "flax": flax.__version__,
            "torch": torch.__version__,
            "mmseg": mmseg.__version__,
        },
    }


def machine_slug(machine: dict) -> str:
    """'nvidia-h100-80gb-hbm3' on an accelerator, else the CPU model and core count, e.g. 'amd-epyc-2c'."""
    name = machine["jax_devices"][0] if machine["jax_backend"] != "cpu" else machine["cpu"].split(" (")[0]
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug if machine["jax_backend"] != "cpu" else f"{slug}-{machine['cores_used']}c"


def git_state() -> dict:
    """The checked-out commit and the files under segnext_jax/ that differ from it (the code actually measured)."""
    changed = _run(["git", "status", "--porcelain", "--", "segnext_jax"]).splitlines()
    return {"commit": _run(["git", "rev-parse", "HEAD"]), "modified": [line[3:] for line in changed]}


# ---------------------------------------------------------------------------------------------------------- report
def markdown(report: dict) -> str:
    """The report as a markdown page: machine, settings, one table row per configuration."""
    m, s = report["machine"], report["settings"]
    devices = m["nvidia_smi"] or ", ".join(sorted(set(m["jax_devices"])))
    lines = [
        f"# SegNeXt benchmark: this project vs MMSegmentation {m['versions']['mmseg']} (PyTorch)",
        "",
        f"- date: {report['date']}; commit {report['git']['commit'][:12]}"
        + (f" with local changes to {', '.join(report['git']['modified'])}" if report["git"]["modified"] else ""),
        f"- machine: {m['cpu']}, {m['cores']} cores ({m['cores_used']} used), {m['memory_gib']} GiB; "
        f"SIMD {' '.join(m['simd'])}; devices: {devices}; reference on {m['torch_device']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
        f"- settings: dtype {s['dtype']}, depthwise_impl {s['depthwise_impl']} ({s['depthwise_impl_resolved']}), "
        f"threads {s['threads']}, "
        f"{s['iters']} timed calls per side after {s['warmup']} warm-up, alternating ours/reference, "
        f"{s.get('settle', 0)} untimed call(s) at the start of each turn; "
        f"malloc huge pages {'on' if s.get('malloc_huge_pages') else 'off'}; "
        f"{NUM_CLASSES} classes",
        f"- load average (1 min) at start: {report['load_avg_start']:.2f}, end: {report['load_avg_end']:.2f}",
        "",
        "| model | mode | batch | input | ours ms (min) | ref ms (min) | speed-up (ref/ours) "
        "| ours / ref ms after switch | ours img/s | ref img/s | ours compile s | ref first call s | ours peak MiB "
        "| ref peak MiB | ours CPU s | ref CPU s | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def after_switch(numbers: dict) -> str:
        return "-" if numbers.get("after_switch_ms") is None else f"{numbers['after_switch_ms']:.0f}"

    for r in report["results"]:
        o, ref = r["ours"], r["reference"]
        lines.append(
            f"| {r['variant'].upper()} | {r['mode']} | {r['batch']} | {r['height']}x{r['width']} "
            f"| {o['latency_ms']:.1f} ({o['latency_ms_min']:.1f}) "
            f"| {ref['latency_ms']:.1f} ({ref['latency_ms_min']:.1f}) "
            f"| {r['speedup']:.2f}x | {after_switch(o)} / {after_switch(ref)} "
            f"| {o['images_per_s']:.2f} | {ref['images_per_s']:.2f} | {o['compile_s']:.1f} "
            f"| {ref['first_call_s']:.2f} | {o['peak_mib']:.0f} | {ref['peak_mib']:.0f} "
            f"| {o['cpu_s_per_call']:.2f} | {ref['cpu_s_per_call']:.2f} "
            f"| {r['load_avg_before']:.1f}-{r['load_avg_after']:.1f} |"
        )
    lines += [
        "",
        "Latency: median (and minimum) wall time of one call; speed-up from the medians; after switch: median of the "
        "untimed first call of each turn, right after the other side's. CPU s: median process CPU "
        "seconds per call (all threads, spin-waiting included). Peak MiB: "
        + (
            "growth of the process's peak resident memory during one call (activations and temporaries)."
            if m["jax_backend"] == "cpu"
            else "ours XLA's program footprint (memory_analysis), reference torch.cuda.max_memory_allocated."
        ),
        "",
    ]
    return "\n".join(lines)


def parse_size(text: str) -> tuple[int, int]:
    """'512x1024' -> (512, 1024) (height, width)."""
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    if not match:
        raise argparse.ArgumentTypeError(f"size {text!r} must be HEIGHTxWIDTH, e.g. 512x512")
    return int(match.group(1)), int(match.group(2))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    accelerator = jax.default_backend() != "cpu"
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default="t,b", help="comma-separated SegNeXt variants")
    parser.add_argument("--modes", default="eval,train", help="eval, train or both")
    parser.add_argument("--eval_batches", default="1,8,16" if accelerator else "1")
    parser.add_argument("--sizes", default="512x512,768x1536,1024x2048" if accelerator else "512x512",
                        help="evaluation input sizes HxW")  # fmt: skip
    parser.add_argument("--train_batch", type=int, default=16 if accelerator else 2)
    parser.add_argument("--train_size", type=parse_size, default=(512, 512))
    parser.add_argument("--iters", type=int, default=20 if accelerator else 5, help="timed calls per side")
    parser.add_argument("--warmup", type=int, default=3 if accelerator else 1, help="untimed calls per side (>= 1)")
    parser.add_argument("--settle", type=int, default=1, help="untimed calls at the start of each turn (>= 0)")
    parser.add_argument("--threads", type=int, default=None, help="CPUs for both sides (default: leave as is)")
    parser.add_argument("--dtype", default="bfloat16" if accelerator else "float32", choices=sorted(models.DTYPES))
    parser.add_argument("--depthwise_impl", default="auto", choices=["auto", "xla", "native", "shift_add", "portable"])
    parser.add_argument("--output_dir", default=os.path.join(REPO, "benchmarks"))
    parser.add_argument("--name", default="", help="suffix of the output file names")
    parser.add_argument("--append", action="store_true", help="add to the results of today's file of the same name")
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.iters < 1 or args.settle < 0:
        parser.error("--warmup and --iters must be >= 1, --settle >= 0")
    return args


def configs(args: argparse.Namespace) -> list[Config]:
    """Every configuration to run, in order: per variant the eval sizes and batches, then the training step."""
    modes = args.modes.split(",")
    result = []
    for variant in args.variants.split(","):
        if variant not in models.VARIANTS:
            raise SystemExit(f"--variants: unknown variant {variant!r}; choose from {sorted(models.VARIANTS)}")
        if "eval" in modes:
            for height, width in map(parse_size, args.sizes.split(",")):
                result += [Config(variant, "eval", int(b), height, width) for b in args.eval_batches.split(",")]
        if "train" in modes:
            result.append(Config(variant, "train", args.train_batch, *args.train_size))
    return result


def main(argv: list[str] | None = None) -> dict:
    """Runs the benchmark and writes the markdown and JSON reports; returns the report."""
    args = parse_args(argv)
    if args.threads:
        # before the first JAX computation: XLA:CPU sizes its thread pools from the affinity mask
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])
        torch.set_num_threads(args.threads)
    todo = configs(args)
    machine = describe_machine()
    report = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "git": git_state(),
        "machine": machine,
        "settings": {
            **{k: v for k, v in vars(args).items() if k != "output_dir"},
            # what 'auto' stood for here: 'shift_add' where the native kernels did not build
            "depthwise_impl_resolved": depthwise.resolve_impl(args.depthwise_impl, jnp.dtype(args.dtype)),
            "malloc_huge_pages": malloc.huge_pages_enabled(),
        },
        "load_avg_start": os.getloadavg()[0],
        "results": [],
    }
    stem = os.path.join(
        args.output_dir, f"{report['date'][:10]}_{machine_slug(machine)}" + (f"_{args.name}" if args.name else "")
    )
    if args.append and os.path.exists(stem + ".json"):
        with open(stem + ".json") as previous:
            report["results"] = json.load(previous)["results"]
    for config in todo:
        print(f"running {config} ...", flush=True)
        report["results"].append(run_config(config, args))
        r = report["results"][-1]
        print(f"  ours {r['ours']['latency_ms']:.1f} ms, reference {r['reference']['latency_ms']:.1f} ms, "
              f"speed-up {r['speedup']:.2f}x", flush=True)  # fmt: skip
        report["load_avg_end"] = os.getloadavg()[0]
        write_report(report, stem)  # after every configuration: a run stopped later keeps what it measured
    print(markdown(report))
    return report


def write_report(report: dict, stem: str) -> None:
    """Writes `stem`.json and `stem`.md, each replaced whole (a reader never sees half a file)."""
    os.makedirs(os.path.dirname(stem), exist_ok=True)
    for suffix, text in ((".json", json.dumps(report, indent=1)), (".md", markdown(report))):
        with open(stem + suffix + ".tmp", "w") as out:
            out.write(text)
        os.replace(stem + suffix + ".tmp", stem + suffix)


if __name__ == "__main__":
    main()
