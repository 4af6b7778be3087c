#!/usr/bin/env python
"""Write the synthetic multimodal head CT phantom (NCCT, CTP, CTA) as DICOM.

Each patient gets one study with three series under
``OUT/patientNN/{01_ncct,02_ctp,03_cta}/``; see ``tfgan_ct.demo.phantom`` for the
anatomy, contrast and header conventions. The same arguments always give
byte-identical files.

Usage::

    python tools/make_phantom.py --out data/phantom [--patients 9] [--seed 0] [--size 512]
        [--ncct-slices 8] [--ctp-slices 4] [--ctp-timepoints 24] [--cta-slices 16] [--workers 2]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

try:
    from tfgan_ct.demo.phantom import SERIES, make_dataset
except ImportError:  # running from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tfgan_ct.demo.phantom import SERIES, make_dataset


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Write a synthetic stroke-protocol head CT phantom (NCCT, CTP, CTA) as DICOM.")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--patients", type=int, default=9, help="number of patients (default 9)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--size", type=int, default=512, help="image rows and columns (default 512)")
    parser.add_argument("--ncct-slices", type=int, default=8, help="NCCT 5 mm slices (default 8)")
    parser.add_argument("--ctp-slices", type=int, default=4, help="CTP table positions (default 4)")
    parser.add_argument("--ctp-timepoints", type=int, default=24,
                        help="CTP time points, 2 s apart (default 24)")
    parser.add_argument("--cta-slices", type=int, default=16, help="CTA 0.625 mm slices (default 16)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="patients written in parallel (default: min(2, CPUs))")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.patients < 1:
        print("--patients must be >= 1", file=sys.stderr)
        return 2
    start = time.perf_counter()
    studies = make_dataset(
        args.out, n_patients=args.patients, seed=args.seed, size=args.size, workers=args.workers,
        ncct_slices=args.ncct_slices, ctp_slices=args.ctp_slices,
        ctp_timepoints=args.ctp_timepoints, cta_slices=args.cta_slices)
    total = 0
    for index, study in enumerate(studies):
        counts = ", ".join(f"{key} {len(paths)}" for key, paths in study.items())
        folder = study["ncct"][0].parents[1] if study["ncct"] else args.out
        print(f"patient {index:02d}: {folder} ({counts} images)")
        total += sum(len(paths) for paths in study.values())
    described = ", ".join(f"{key}: {spec.description!r}" for key, spec in SERIES.items())
    print(f"wrote {total} DICOM files for {len(studies)} patients ({args.size}x{args.size}; "
          f"{described}) to {args.out} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
