"""Benchmark the training input pipeline: HR-128 patches/s with augmentation.

    python tools/bench_pipeline.py [--patients 3] [--seconds 10] [--batch 16]

Converts a phantom study with the paper's patch size (128, stride 64 to get
more patches), then times `tfgan_ct.data.train_dataset` (parse, window,
random flips/rotations, shuffle, batch, prefetch) against the baseline of
reading the same TFRecord files raw, in the same process. Also prints the
CPU time (all threads of the process) per patch: on shared cores it varies
less than the rate, and 2 cores / that time bounds the rate on a quiet machine.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def rate(dataset, per_element: int, seconds: float) -> tuple[float, float]:
    """(elements x per_element per second, CPU microseconds per element x per_element)
    over `seconds`, after a short warm-up."""
    it = iter(dataset)
    for _ in range(20):
        next(it)
    n, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        next(it)
        n += per_element
    return n / (time.perf_counter() - start), (time.process_time() - cpu) / n * 1e6


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--patients", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args(argv)

    import tensorflow as tf

    from tfgan_ct import data
    from tfgan_ct.config import load_config
    from tfgan_ct.convert import convert
    from tfgan_ct.phantom import make_dataset

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
            files = data.shard_files(tmp / "data", "train", modality)
            raw = tf.data.TFRecordDataset(files).repeat().batch(args.batch).prefetch(tf.data.AUTOTUNE)
            base, base_cpu = rate(raw, args.batch, args.seconds / 2)
            full, full_cpu = rate(data.train_dataset(tmp / "data", modality, cfg), args.batch, args.seconds)
            print(f"{modality}: raw TFRecord read {base:9.0f} records/s ({base_cpu:5.1f} us CPU each) | "
                  f"train_dataset {full:9.0f} patches/s ({full_cpu:5.1f} us CPU each) | ratio {full / base:.2f}")


if __name__ == "__main__":
    main()
