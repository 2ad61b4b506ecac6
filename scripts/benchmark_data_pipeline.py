"""Training-pipeline throughput, ours (grain + numpy/OpenCV) against MMSegmentation 1.2.2's, on the same images.

Usage: python scripts/benchmark_data_pipeline.py [--root=ADEChallengeData2016] [--num_images=48] [--workers=2]
           [--output=benchmarks/data_pipeline.md]

Without --root it writes --num_images ADE20K-like JPEG/PNG pairs (683x512, labels 0..150) to a temporary
ADE20K tree. Both sides run the ADE20K recipe (load, reduce_zero_label, RandomResize (2048, 512) x U(0.5, 2),
RandomCrop 512 with cat_max_ratio 0.75, RandomFlip, PhotoMetricDistortion, normalise, pad to 512):
- per worker: one process, one OpenCV / torch thread, a plain loop over the examples; the reference runs its
  dataset pipeline up to PackSegInputs, then SegDataPreProcessor's normalise + pad on CPU (which mmseg runs on the
  accelerator, so it is reported separately as well);
- loader: ours `make_train_dataset(num_workers=W)` batches of 8; the reference's dataset in a torch DataLoader
  with W workers and pseudo_collate (its preprocessor not included); timed after every worker has started.
Each is reported as images per CPU second (CPU time of the process and its workers: robust to other load on a
shared machine) and as wall-clock images/s; --rounds interleaved repetitions, medians reported.
The tests' oracle is needed for the reference (mmcv-lite lacks compiled ops): tests/oracle.py.
"""

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
import warnings

import cv2
import numpy as np
import psutil
import torch
from absl import flags

from segnext_jax.data import pipeline, sources, transforms

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from oracle import import_mmseg  # the reference, imported as the tests do

CROP, SCALE = (512, 512), (2048, 512)
MEAN, STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]


def write_fake_ade20k(root: str, count: int) -> None:
    """ADE20K-like pairs: smooth colour fields with texture and noise (JPEG q95), blocky labels 0..150."""
    rng = np.random.default_rng(0)
    for folder in ("images/training", "annotations/training"):
        os.makedirs(os.path.join(root, folder), exist_ok=True)
    yy, xx = np.mgrid[0:512, 0:683].astype(np.float32)
    for i in range(count):
        phase = rng.uniform(0, 6, 3)
        image = 120 + 60 * np.sin(xx[..., None] / rng.uniform(20, 80) + yy[..., None] / 50 + phase)
        image += rng.normal(0, 12, image.shape)
        cv2.imwrite(f"{root}/images/training/ADE_{i:05d}.jpg", np.clip(image, 0, 255).astype(np.uint8),
                    [cv2.IMWRITE_JPEG_QUALITY, 95])  # fmt: skip
        blocks = rng.integers(0, 151, (512 // 64 + 1, 683 // 64 + 1)).astype(np.uint8)
        label = np.kron(blocks, np.ones((64, 64), np.uint8))[:512, :683]
        cv2.imwrite(f"{root}/annotations/training/ADE_{i:05d}.png", label)


def cpu_seconds() -> float:
    """User + system CPU time of this process and its live child processes (prefetch workers)."""
    processes = [psutil.Process(), *psutil.Process().children(recursive=True)]
    return sum(sum(process.cpu_times()[:2]) for process in processes)


def rates(run, images: int) -> tuple[float, float]:
    """(images per wall-clock second, images per CPU second) of `run()`, which processes `images` images.

    On a shared machine the first depends on the background load; the second (CPU time of this process and its
    workers) hardly does: it is the rate of one fully used core.
    """
    wall, cpu = time.perf_counter(), cpu_seconds()
    run()
    return images / (time.perf_counter() - wall), images / (cpu_seconds() - cpu)


def time_per_image(run_one, count: int) -> tuple[float, float]:
    """`rates` of `run_one(i)` over `count` examples, after one warm-up call."""
    run_one(0)

    def run() -> None:
        for i in range(count):
            run_one(i)

    return rates(run, count)


def ours_per_worker(root: str, count: int) -> tuple[float, float]:
    """`rates` of our load + train_transform in a plain loop."""
    data = sources.open_source("ade20k", root, "train")

    def run_one(i: int) -> None:
        example = data.load(data.records[i % len(data.records)])
        transforms.train_transform(example["image"], example["label"], np.random.default_rng(i), crop_size=CROP,
                                   scale=SCALE)  # fmt: skip

    return time_per_image(run_one, count)


def reference_pipeline(root: str):
    """The reference ADE20K training dataset (transforms up to PackSegInputs) and its data preprocessor."""
    import_mmseg()
    from mmseg.datasets import ADE20KDataset
    from mmseg.models.data_preprocessor import SegDataPreProcessor

    steps = [
        {"type": "LoadImageFromFile"},
        {"type": "LoadAnnotations", "reduce_zero_label": True},
        {"type": "RandomResize", "scale": SCALE, "ratio_range": (0.5, 2.0), "keep_ratio": True},
        {"type": "RandomCrop", "crop_size": CROP, "cat_max_ratio": 0.75},
        {"type": "RandomFlip", "prob": 0.5},
        {"type": "PhotoMetricDistortion"},
        {"type": "PackSegInputs"},
    ]
    from mmengine.registry import init_default_scope

    init_default_scope("mmseg")
    dataset = ADE20KDataset(
        data_root=root, data_prefix={"img_path": "images/training", "seg_map_path": "annotations/training"},
        pipeline=steps,
    )  # fmt: skip
    preprocessor = SegDataPreProcessor(mean=MEAN, std=STD, bgr_to_rgb=True, pad_val=0, seg_pad_val=255, size=CROP)
    return dataset, preprocessor


def reference_per_worker(dataset, preprocessor, count: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """`rates` of the dataset pipeline, and of the pipeline followed by the preprocessor on CPU."""
    pipeline_only = time_per_image(lambda i: dataset[i % len(dataset)], count)

    def with_preprocessor(i: int) -> None:
        packed = dataset[i % len(dataset)]
        with torch.no_grad():
            preprocessor({"inputs": [packed["inputs"]], "data_samples": [packed["data_samples"]]}, training=True)

    return pipeline_only, time_per_image(with_preprocessor, count)


def time_batches(iterator, workers: int, batches: int) -> tuple[float, float]:
    """`rates` over `batches` batches of 8, after 2 * workers + 1 warm-up batches (every worker started)."""
    for _ in range(2 * workers + 1):
        next(iterator)

    def run() -> None:
        for _ in range(batches):
            next(iterator)

    return rates(run, 8 * batches)


def ours_loader(root: str, workers: int, batches: int) -> tuple[float, float]:
    """`rates` of our grain training pipeline with `workers` prefetch processes."""
    dataset = pipeline.make_train_dataset("ade20k", root, crop_size=CROP, scale=SCALE, global_batch_size=8, seed=0,
                                          num_workers=workers, read_threads=1)  # fmt: skip
    iterator = iter(dataset)
    rate = time_batches(iterator, workers, batches)
    iterator.close()
    return rate


def reference_loader(dataset, workers: int, batches: int) -> tuple[float, float]:
    """`rates` of the reference dataset in a torch DataLoader with `workers` processes."""
    from mmengine.dataset import pseudo_collate

    sampler = torch.utils.data.RandomSampler(dataset, num_samples=8 * (batches + 2 * workers + 1))
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, sampler=sampler, num_workers=workers,
                                         collate_fn=pseudo_collate)  # fmt: skip
    return time_batches(iter(loader), workers, batches)


def machine() -> str:
    """CPU model and logical core count from /proc/cpuinfo, and the software versions that matter here."""
    with open("/proc/cpuinfo") as f:
        lines = f.read().splitlines()
    models = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    flags_line = next((line for line in lines if line.startswith("flags")), "")
    simd = [s for s in ("avx2", "avx512f") if f" {s}" in flags_line]
    return (f"{models[0] if models else platform.processor()}, {len(models)} logical cores ({', '.join(simd)}); "
            f"Python {platform.python_version()}, OpenCV {cv2.__version__}, numpy {np.__version__}, "
            f"torch {torch.__version__}")  # fmt: skip


def measure(root: str, num_images: int, workers: int, batches: int) -> dict[str, tuple[float, float]]:
    """One round of every measurement: name -> (images per wall second, images per CPU second)."""
    dataset, preprocessor = reference_pipeline(root)
    ref_pipeline, ref_full = reference_per_worker(dataset, preprocessor, num_images)
    return {
        "ours": ours_per_worker(root, num_images),
        "ref_pipeline": ref_pipeline,
        "ref_full": ref_full,
        "ours_loader": ours_loader(root, workers, batches),
        "ref_loader": reference_loader(dataset, workers, batches),
    }


def load_average() -> str:
    """The 1, 5 and 15 minute load averages."""
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark, prints a markdown report and writes it to --output."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None, help="an ADEChallengeData2016 root (default: synthetic images)")
    parser.add_argument("--num_images", type=int, default=48)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--loader_batches", type=int, default=16, help="batches of 8 timed per loader run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; the median is reported")
    parser.add_argument("--output", default=None, help="markdown file to write the report to")
    args = parser.parse_args(argv)
    flags.FLAGS.mark_as_parsed()  # grain's worker processes read an absl flag
    warnings.filterwarnings("ignore", category=UserWarning)  # the reference's deprecation notices
    load_before = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root
        if root is None:
            root = tmp
            write_fake_ade20k(root, args.num_images)
        cv2.setNumThreads(1)
        torch.set_num_threads(1)
        rounds = [measure(root, args.num_images, args.workers, args.loader_batches) for _ in range(args.rounds)]
    wall = {key: [r[key][0] for r in rounds] for key in rounds[0]}
    cpu = {key: [r[key][1] for r in rounds] for key in rounds[0]}
    rows = [
        ("ours", "ours, per worker (1 process, 1 OpenCV thread): load + augment + normalise + pad"),
        ("ref_pipeline", "MMSegmentation, per worker: dataset pipeline (load .. PackSegInputs)"),
        ("ref_full", "MMSegmentation, per worker: pipeline + SegDataPreProcessor normalise/pad on CPU"),
        ("ours_loader", f"ours, grain loader, {args.workers} workers, batch 8"),
        ("ref_loader", f"MMSegmentation, torch DataLoader, {args.workers} workers, batch 8 (no preprocessor)"),
    ]
    images = args.root or f"{args.num_images} synthetic 683x512 JPEG q95 + PNG labels"
    command = " ".join(argv if argv is not None else sys.argv[1:])
    report = "\n".join(
        [
            "# Training data pipeline throughput",
            "",
            f"- Date: {datetime.date.today().isoformat()}",
            f"- Machine: {machine()}",
            f"- Load average (1/5/15 min) before / after: {load_before} / {load_average()}",
            f"- Images: {images}; ADE20K recipe, crop {CROP[0]}x{CROP[1]}, scale {SCALE} x U(0.5, 2.0)",
            f"- Command: `python scripts/benchmark_data_pipeline.py {command}`",
            "",
            f"| | images per CPU second (median of {args.rounds}) | images/s wall-clock: median (min - max) |",
            "|---|---|---|",
            *(
                f"| {label} | {np.median(cpu[key]):.1f} | {np.median(wall[key]):.1f} ({min(wall[key]):.1f} - "
                f"{max(wall[key]):.1f}) |"
                for key, label in rows
            ),
            "",
            "Images per CPU second count the CPU time of the measuring process and its workers, so they are the",
            "rate of one fully used core whatever else runs on the machine; wall-clock rates depend on that load.",
            "",
        ]
    )
    print(report)
    if args.output:
        with open(args.output, "w") as f:
            f.write(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
