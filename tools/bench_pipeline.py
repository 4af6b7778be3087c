"""Benchmark the training input pipeline: HR-128 patches/s with augmentation.

    python tools/bench_pipeline.py [--patients 2] [--seconds 8] [--batch 16] [--skip 100000]

Converts a phantom study with the paper's patch size (128, stride 64 to get
more patches), then times `tfgan_ct.data.pipeline.train_dataset` (parse, window,
random flips/rotations, shuffle, batch, prefetch) against the baseline of
reading the same TFRecord files raw, in the same process: unseeded (any
order) and seeded (one fixed order, as training runs it), and how fast a
resumed run skips the patches its steps before the checkpoint read. Batches are pulled
inside a `tf.function` loop, the way Keras's training step pulls them, so
Python's per-batch overhead is not counted. Also prints the CPU time (all threads of the
process) per patch: on shared cores it varies less than the rate, and
2 cores / that time bounds the rate on a quiet machine.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def rate(dataset, seconds: float) -> tuple[float, float]:
    """(examples per second, CPU microseconds per example) of `dataset`'s batches
    (dicts with 'hr', or raw record strings) over `seconds`, after a warm-up."""
    import tensorflow as tf

    iterator = iter(dataset)

    @tf.function
    def pull(n):
        count = tf.constant(0, tf.int64)
        for _ in tf.range(n):
            batch = next(iterator)
            first = batch["hr"] if isinstance(batch, dict) else batch
            count += tf.shape(first, out_type=tf.int64)[0]
        return count

    pull(tf.constant(20))
    n, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        n += int(pull(tf.constant(20)))
    return n / (time.perf_counter() - start), (time.process_time() - cpu) / n * 1e6


def skip_rate(make, patches: int) -> float:
    """Patches per second that `train_dataset(start=...)` skips when a run resumes:
    time to the first batch with `start=patches` minus that with `start=0`."""
    def first_batch(start):
        t = time.perf_counter()
        next(iter(make(start)))
        return time.perf_counter() - t

    first_batch(0)  # warm-up (tracing)
    return patches / max(first_batch(patches) - first_batch(0), 1e-9)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--patients", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--skip", type=int, default=100_000, help="patches skipped by the resume timing")
    args = parser.parse_args(argv)

    import tensorflow as tf

    from tfgan_ct.config import load_config
    from tfgan_ct.data import pipeline
    from tfgan_ct.data.convert import convert
    from tfgan_ct.demo.phantom import make_dataset

    cfg = load_config(None, ["convert.patch_stride=64", "convert.split=1:0:0", "convert.shard_size=512",
                             f"data.batch_size={args.batch}"])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_dataset(tmp / "dicom", n_patients=args.patients, seed=0, size=512)
        summary = convert([tmp / "dicom"], tmp / "data", cfg, progress=False)
        print(f"{sum(summary.records.values())} HR-128 training patches in "
              f"{len(list((tmp / 'data').glob('train-*')))} shards; batch {args.batch}; "
              f"{os.cpu_count()} core(s)")
        for modality in ("ncct", "ctp", "cta"):
            files = pipeline.shard_files(tmp / "data", "train", modality)
            raw = tf.data.TFRecordDataset(files).repeat().batch(args.batch).prefetch(tf.data.AUTOTUNE)
            base, base_cpu = rate(raw, args.seconds / 2)
            full, full_cpu = rate(pipeline.train_dataset(tmp / "data", modality, cfg), args.seconds)
            seeded, seeded_cpu = rate(pipeline.train_dataset(tmp / "data", modality, cfg, seed=0), args.seconds)
            def resumed(start, modality=modality):
                return pipeline.train_dataset(tmp / "data", modality, cfg, seed=0, start=start)

            skip = skip_rate(resumed, args.skip)
            print(f"{modality}: raw TFRecord read {base:7.0f} records/s ({base_cpu:5.1f} us CPU each) | "
                  f"train_dataset {full:7.0f} patches/s ({full_cpu:5.1f} us CPU each), ratio {full / base:.2f} | "
                  f"seeded (as training runs it) {seeded:7.0f} patches/s ({seeded_cpu:5.1f} us CPU each), "
                  f"ratio {seeded / base:.2f} | resume skip {skip:7.0f} patches/s", flush=True)


if __name__ == "__main__":
    main()
