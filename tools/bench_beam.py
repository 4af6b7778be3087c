"""Time `tfgan-ct convert` locally and as an Apache Beam pipeline (DirectRunner) on the phantom.

    python tools/bench_beam.py [--patients 3] [--size 512] [--workers 2] [--repeats 2]

Converts the same phantom study (paper settings) with `--runner local` and with
`--runner beam` (DirectRunner, multi-process mode, the same number of workers),
prints slices/s end to end for each (best of `--repeats`), and checks that both
datasets have the same manifest and shard files. Needs the beam extra
(`pip install 'tfgan-ct[beam]'`). TensorFlow and Beam are imported before timing.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def timed(fn, repeats: int) -> tuple[list[float], object]:
    """Seconds of each of `repeats` calls `fn(i)`, and the last result."""
    times, result = [], None
    for i in range(repeats):
        start = time.perf_counter()
        result = fn(i)
        times.append(time.perf_counter() - start)
    return times, result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--patients", type=int, default=3)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=2, help="conversions to time per runner (best is kept)")
    args = parser.parse_args(argv)

    import apache_beam  # noqa: F401 - import outside the timed region
    import tensorflow  # noqa: F401

    from tfgan_ct.config import Config
    from tfgan_ct.data.beam_conversion import convert_with_beam
    from tfgan_ct.data.convert import convert
    from tfgan_ct.demo.phantom import make_dataset

    beam_options = f"--direct_num_workers={args.workers} --direct_running_mode=multi_processing"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_dataset(tmp / "dicom", n_patients=args.patients, seed=0, size=args.size)
        n = len(list((tmp / "dicom").rglob("*.dcm")))
        local, summary = timed(lambda i: convert([tmp / "dicom"], tmp / f"local{i}", Config(),
                                                 workers=args.workers, progress=False), args.repeats)
        beam, _ = timed(lambda i: convert_with_beam([tmp / "dicom"], tmp / f"beam{i}", Config(),
                                                    beam_options=beam_options, workers=args.workers,
                                                    progress=False), args.repeats)
        last = args.repeats - 1
        same = all((tmp / f"local{last}" / f.name).read_bytes() == f.read_bytes()
                   for f in (tmp / f"beam{last}").iterdir() if f.name != "convert.log")
        print(f"{n} slices of {args.size}x{args.size}, {args.patients} patients, {args.workers} worker(s), "
              f"{os.cpu_count()} core(s), {sum(summary.records.values())} records")
        for name, times in (("convert --runner local", local), ("convert --runner beam (Direct)", beam)):
            print(f"{name:31s}: {n / min(times):7.1f} slices/s "
                  f"(best of {args.repeats}: {', '.join(f'{t:.2f}' for t in times)} s)")
        print(f"beam / local time              : {min(beam) / min(local):7.2f}")
        print(f"same manifest and shards       : {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
