"""Benchmark `tfgan-ct convert` on 512x512 phantom slices against a plain pydicom read.

    python tools/bench_convert.py [--patients 4] [--size 512] [--workers 2]
    python tools/bench_convert.py --real ../shared/data/dicom/head-ncct/pydicom-data_693_UNCR.dcm \
        --patients 40 --slices 28

With `--real FILE` the input is not the phantom but one real uncompressed CT
slice written as --patients studies of --slices slices each (new patient IDs
and UIDs, consecutive positions; same pixels): the measurement the speed goal
of `convert` is stated for (40 x 28 real 512x512 head CT slices).

Prints slices/s for (a) reading and decoding every file with plain pydicom in
one process, the baseline, and (b) the whole conversion (header pass,
decoding, masking, MATLAB-style resize, patch extraction, TFRecord writing,
manifest) with the given number of worker processes, and their ratio; then
(c) the conversion in this one process (`--workers 1`) with the CPU time it
used, a figure that shared cores disturb less than the wall-clock rates.
TensorFlow (which `convert` no longer needs; older versions wrote shards with it) is
imported before timing; start-up is not counted.

`--stages` then times each step of the conversion alone, in this process, with
the package's own functions on the same files and the same split (CPU ms per
slice, best of `--stage-repeats`): header pass, pixel read, brain mask, HR,
resize, encoding, TFRecord framing, and hashing and writing the shards. Their
sum on the given cores, with no overhead at all, bounds what `convert` can
reach, and that bound is printed against the plain read.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def plain_pydicom(files: list[Path]) -> float:
    """Seconds to read and decode every file with pydicom alone (one process)."""
    import pydicom

    start = time.perf_counter()
    for path in files:
        _ = pydicom.dcmread(path).pixel_array
    return time.perf_counter() - start


def copy_real(source: Path, out: Path, patients: int, slices: int) -> None:
    """Write `source` (one real CT slice) as `patients` studies of `slices` slices: new patient IDs
    and UIDs, positions 5 mm apart, the pixels unchanged."""
    import pydicom
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(source)
    position = [float(v) for v in ds.get("ImagePositionPatient", [0, 0, 0])]
    for p in range(patients):
        ds.PatientID, ds.PatientName = f"BENCH{p:03d}", f"Bench^{p:03d}"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        folder = out / f"patient{p:03d}"
        folder.mkdir(parents=True)
        for i in range(slices):
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.InstanceNumber = i + 1
            ds.ImagePositionPatient = [position[0], position[1], position[2] + 5.0 * i]
            ds.SliceLocation = position[2] + 5.0 * i
            ds.save_as(folder / f"IM{i + 1:05d}.dcm")


def stage_costs(folder: Path, repeats: int) -> dict[str, float]:
    """CPU ms per slice of each step of a conversion of `folder`, timed one step at a time
    with the package's functions, on the split the conversion itself would make."""
    import tempfile as tmp

    import numpy as np

    from tfgan_ct.config import Config
    from tfgan_ct.data import dicom_io, resize
    from tfgan_ct.data.conversion import InProcess, salt_of
    from tfgan_ct.data.convert import plan_series, prepare_slice, scan, slice_records
    from tfgan_ct.data.masking import brain_mask
    from tfgan_ct.data.shards import RecordMeta, ShardFile, framed

    _worker_malloc()
    cfg = Config()
    oof = cfg.convert.out_of_field_hu
    frames, _ = scan([folder], InProcess(), False)
    plans = plan_series(frames, cfg, "auto", salt_of(cfg), None)
    items = [(plan, f) for plan in plans for f in plan.frames]
    paths = [f.path for _, f in items]

    def best(fn) -> float:
        runs = []
        for _ in range(repeats):
            start = time.process_time()
            fn()
            runs.append(time.process_time() - start)
        return min(runs) * 1e3 / len(items)

    hu = [dicom_io.read_hu(f.path, [f.frame], oof, f.layout, whole=True)[0] for _, f in items]
    settings = [cfg.modalities.get(plan.modality) for plan, _ in items]
    ranges = [s.mask_hu for s in settings]
    masks = [brain_mask(h, r, cfg.convert.mask) for h, r in zip(hu, ranges)]
    results = [prepare_slice(h, i, f.pixel_spacing, plan.modality, cfg) for i, (h, (plan, f)) in
               enumerate(zip(hu, items))]
    metas = [RecordMeta(plan.modality, plan.split, plan.patient_hash, plan.series_hash, 0) for plan, _ in items]
    records = [r for result, meta in zip(results, metas) for r in slice_records(result, meta, cfg)]
    framed_records = [b"".join(framed(r)) for r in records]

    def hr_step():
        for h, m, s in zip(hu, masks, settings):
            hr = np.array(h)
            np.copyto(hr, np.int16(s.window.floor), where=~m)

    def write_step():
        with tmp.TemporaryDirectory() as out:
            shard = ShardFile(Path(out) / "bench.tfrecord", "ncct")
            for r in framed_records:
                shard.write(r)
            shard.finish()

    def each(fn, *lists):
        """Call `fn` on every item (of zipped `lists`), keeping no result: the arrays of
        one slice are freed before the next, as in a conversion."""
        def run():
            for args in zip(*lists):
                fn(*args)
        return run

    costs = {
        "header pass (pydicom header, Frames)": best(each(dicom_io.frames_of, paths)),
        "pixel read (int16 HU)": best(each(lambda f: dicom_io.read_hu(f.path, [f.frame], oof, f.layout, whole=True),
                                           [f for _, f in items])),
        "brain mask": best(each(lambda h, r: brain_mask(h, r, cfg.convert.mask), hu, ranges)),
        "HR (window floor outside the mask)": best(hr_step),
        "MATLAB bicubic x1/4": best(each(lambda r: resize.downscale(r.hr, 4).astype(np.float32), results)),
        "patches and encoding": best(each(lambda r, m: slice_records(r, m, cfg), results, metas)),
        "TFRecord framing (CRC-32C)": best(each(framed, records)),
        "SHA-256 and writing the shards": best(write_step),
    }
    print(f"{sum(map(len, framed_records)) / len(items) / 1e3:.0f} kB of shards per slice")
    return costs


def _worker_malloc() -> None:
    """The malloc settings conversion workers run with (`conversion._WORKER_ENV`), set in
    this process: freed slice arrays stay in the heap instead of being faulted in anew."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 64 << 20)   # M_MMAP_THRESHOLD
    libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD


def pydicom_size(path: Path) -> str:
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return f"{ds.Rows}x{ds.Columns}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--patients", type=int, default=4)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=2, help="conversions to time (best is kept)")
    parser.add_argument("--real", type=Path, default=None, help="a real CT slice to copy instead of the phantom")
    parser.add_argument("--slices", type=int, default=28, help="--real: slices per patient")
    parser.add_argument("--input", type=Path, default=None,
                        help="keep the input DICOM in this folder: written on the first run, read by later "
                             "ones (e.g. to run two versions of the package one after the other on the "
                             "same files, with PYTHONPATH pointing at each)")
    parser.add_argument("--stages", action="store_true", help="also time each step of the conversion alone")
    parser.add_argument("--stage-repeats", type=int, default=3)
    args = parser.parse_args(argv)

    import tensorflow  # noqa: F401 - import outside the timed region

    from tfgan_ct.config import Config
    from tfgan_ct.data.convert import convert
    from tfgan_ct.demo.phantom import make_dataset

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dicom = args.input or tmp / "dicom"
        if args.input is None or not args.input.exists():
            if args.real:
                copy_real(args.real, dicom, args.patients, args.slices)
            else:
                make_dataset(dicom, n_patients=args.patients, seed=0, size=args.size)
        files = sorted(dicom.rglob("*.dcm"))
        size = pydicom_size(files[0])
        plain_pydicom(files[:20])  # warm the file cache
        base = min(plain_pydicom(files) for _ in range(2))
        times = []
        for i in range(args.repeats):
            start = time.perf_counter()
            summary = convert([dicom], tmp / f"out{i}", Config(), workers=args.workers,
                              progress=False)
            times.append(time.perf_counter() - start)
        best = min(times)
        n = len(files)
        print(f"{n} slices of {size}, {args.patients} patients "
              f"({'copies of ' + args.real.name if args.real else 'phantom'}), {args.workers} worker(s), "
              f"{os.cpu_count()} core(s)")
        print(f"plain pydicom read+decode (1 process): {n / base:8.1f} slices/s")
        print(f"tfgan-ct convert end to end          : {n / best:8.1f} slices/s "
              f"(best of {args.repeats}: {', '.join(f'{t:.2f}' for t in times)} s)")
        print(f"ratio convert / plain read           : {base / best:8.2f}")
        print(f"records written                      : {sum(summary.records.values())}")
        start, cpu = time.perf_counter(), time.process_time()
        convert([dicom], tmp / "single", Config(), workers=1, progress=False)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        print(f"convert in one process (--workers 1) : {n / wall:8.1f} slices/s, "
              f"{n / cpu:.1f} slices per CPU second")
        if args.stages:
            costs = stage_costs(dicom, args.stage_repeats)
            for name, ms in costs.items():
                print(f"  {name:38s}: {ms:6.3f} CPU ms/slice")
            total, cores = sum(costs.values()), os.cpu_count()
            bound = cores * 1e3 / total
            print(f"  {'sum':38s}: {total:6.3f} CPU ms/slice; on {cores} core(s) at most {bound:.0f} slices/s, "
                  f"ratio {bound * base / n:.2f} to the plain read")


if __name__ == "__main__":
    main()
