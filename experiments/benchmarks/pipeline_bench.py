"""Input-pipeline throughput of ``flatjax.data.train_batches`` (images per second).

Cases:

- ``mnist5k``: the offline MNIST subset, batch 128, no augmentation, read from
  its array_record files;
- ``fake_cifar10``: flatjax's synthetic CIFAR-10 look-alike (5,000 32×32×3
  uint8 images in array_record, stored raw rather than PNG) with CIFAR-10's full
  augmentation (crop with padding 4, flip, normalisation) plus Cutout 16;
  batch 128;
- ``cifar10_mock``: CIFAR-10 through ``tfds.testing.mock_data`` (random records
  generated on access instead of read and PNG-decoded), batch 128, full
  augmentation.

Each case runs for several (num_threads, num_workers) settings; the first
``--warmup`` steps (worker start-up, file opening) are not timed.
``images_per_s`` is wall-clock throughput; ``images_per_cpu_s`` (in-process
settings only) is images per CPU-second of this process, the per-core rate
that, times the cores given to the pipeline, bounds what a many-core host
delivers, independently of other load on the machine.

Usage::

    python -m experiments.benchmarks.pipeline_bench \
        --out experiments/benchmarks/results/pipeline.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import tensorflow_datasets as tfds

import flatjax.data as fd
from flatjax.data.testing import mock_official


def measure(name, *, steps, warmup, **kwargs):
    it = fd.train_batches(name, **kwargs)
    for _ in range(warmup):
        next(it)
    start, cpu_start = time.perf_counter(), time.process_time()
    images = 0
    for _ in range(steps):
        images += next(it)["label"].size
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    if hasattr(it, "close"):
        it.close()
    return images / elapsed, images / cpu


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="experiments/benchmarks/results/pipeline.json")
    parser.add_argument("--data-dir", default=None, help="scratch tfds dir (default: a temp dir)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[0, 4])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = parser.parse_args(argv)
    tfds.disable_progress_bar()
    data_dir = args.data_dir or tempfile.mkdtemp(prefix="flatjax-bench-")

    t0 = time.perf_counter()
    fd.prepare("fake_cifar10", data_dir)
    fd.prepare("mnist5k", data_dir)
    prepare_s = time.perf_counter() - t0

    cases = {
        "mnist5k": dict(name="mnist5k"),
        "fake_cifar10": dict(name="fake_cifar10", cutout=16),
        "cifar10_mock": dict(name="cifar10", cutout=16),
    }
    results = []
    for case, spec in cases.items():
        for threads in args.threads:
            for workers in args.workers:
                kw = dict(
                    batch_size=args.batch_size, seed=0, num_threads=threads, num_workers=workers,
                    steps=args.steps, warmup=args.warmup, **spec,
                )  # fmt: skip
                if case == "cifar10_mock":
                    if workers:  # the tfds mock is patched in this process only
                        continue
                    with mock_official("cifar10", os.path.join(data_dir, "mock"), 50000) as d:
                        rate, cpu_rate = measure(data_dir=d, **kw)
                else:
                    rate, cpu_rate = measure(data_dir=data_dir, **kw)
                row = dict(case=case, num_threads=threads, num_workers=workers,
                           batch_size=args.batch_size, images_per_s=round(rate, 1))  # fmt: skip
                if not workers:  # CPU time of this process: all of the work
                    row["images_per_cpu_s"] = round(cpu_rate, 1)
                print(json.dumps(row), flush=True)
                results.append(row)
    report = dict(
        benchmark="flatjax.data.train_batches throughput",
        host=dict(
            cpus=os.cpu_count(), machine=platform.machine(), python=platform.python_version()
        ),
        prepare_seconds=round(prepare_s, 1),
        steps=args.steps,
        warmup=args.warmup,
        results=results,
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
