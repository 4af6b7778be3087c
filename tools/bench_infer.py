"""Benchmark inference of the paper network, whole slices and tiled.

    python tools/bench_infer.py [--lr-size 128] [--slices 3] [--tile 64] [--tile-pad 16]

Exports an (untrained) paper-configuration generator (23 RRDB blocks, 64/32)
as a SavedModel, loads it back the way `tfgan-ct upscale` and TensorFlow
Serving do (plain `tf.saved_model.load`, signature `serving_default`) and
prints, for LR slices of --lr-size (default 128 -> 512):

- the single-precision matrix-multiply peak measured here (GFLOP/s), the baseline;
- untiled: slices/s, achieved GFLOP/s (36 MFLOP per LR pixel) and its fraction of peak;
- tiled with --tile/--tile-pad, and with the `upscale` default (`--tile auto`) when that tiles: the same,
  and the cost against untiled;
- peak resident memory of one untiled and one tiled slice, each in its own process.
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import matmul_peak, numpy_matmul_peak  # noqa: E402

DEFAULT_PAD = 16  # the `tfgan-ct upscale` default; its default tile is `auto` (inference.auto_tile)


def export_paper_generator(folder: Path) -> Path:
    """Export the paper generator (random weights) under `folder`; returns the version folder."""
    from tfgan_ct.config import Window
    from tfgan_ct.deploy.export import export_stage
    from tfgan_ct.model.discriminator import build_discriminator
    from tfgan_ct.model.generator import build_generator

    return export_stage(build_generator(), build_discriminator(128), folder, "ncct", Window(40, 80), 4, {})


def seconds_per_slice(method, lr, tile: int, pad: int, slices: int) -> float:
    from tfgan_ct.deploy.inference import upscale_image

    upscale_image(method, lr, tile, pad)  # warm-up: traces the shapes
    start = time.perf_counter()
    for _ in range(slices):
        upscale_image(method, lr, tile, pad)
    return (time.perf_counter() - start) / slices


def memory_child(path: str, lr_size: int, tile: int, pad: int) -> None:
    import numpy as np

    from tfgan_ct.deploy.inference import saved_model, upscale_image

    method = saved_model(path)
    upscale_image(method, np.random.default_rng(0).random((lr_size, lr_size), np.float32), tile, pad)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lr-size", type=int, default=128, help="LR slice edge (SR = 4x)")
    parser.add_argument("--slices", type=int, default=3, help="timed slices per mode")
    parser.add_argument("--tile", type=int, default=64, help="tile of the tiled run (LR pixels)")
    parser.add_argument("--tile-pad", type=int, default=16)
    parser.add_argument("--memory-child", nargs=3, metavar=("PATH", "TILE", "PAD"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        path, tile, pad = args.memory_child
        memory_child(path, args.lr_size, int(tile), int(pad))
        return

    import numpy as np

    from tfgan_ct.deploy.inference import auto_tile, available_memory, saved_model, tiles
    from tfgan_ct.model.generator import flops_per_lr_pixel

    tf_peak, np_peak = matmul_peak(), numpy_matmul_peak()
    peak = max(tf_peak, np_peak)
    with tempfile.TemporaryDirectory() as tmp:
        path = export_paper_generator(Path(tmp))
        method = saved_model(path)
        lr = np.random.default_rng(0).random((args.lr_size, args.lr_size), np.float32)
        flop = flops_per_lr_pixel() * args.lr_size ** 2
        print(f"{os.cpu_count()} core(s); LR {args.lr_size}x{args.lr_size} -> {4 * args.lr_size}; paper network "
              f"(23 RRDB, 64/32) as a SavedModel; {flop / 1e9:.0f} GFLOP per slice")
        print(f"matrix-multiply peak (float32, 2048^2): {tf_peak:6.1f} GFLOP/s TensorFlow, {np_peak:.1f} "
              f"GFLOP/s NumPy; fractions below are of {peak:.1f}")
        modes = [("untiled", 0, 0), (f"tile {args.tile}, pad {args.tile_pad}", args.tile, args.tile_pad)]
        default = auto_tile(args.lr_size, args.lr_size)
        if 0 < default < args.lr_size:
            modes.append((f"default (--tile auto): tile {default}, pad {DEFAULT_PAD}", default, DEFAULT_PAD))
        else:
            print(f"(the upscale default --tile auto runs a {args.lr_size} slice whole here, with "
                  f"{(available_memory() or 0) / 2**30:.1f} GiB available: the untiled line is the default)")
        base = None
        for name, tile, pad in modes:
            seconds = seconds_per_slice(method, lr, tile, pad, args.slices)
            base = base or seconds
            gflops = flop / seconds / 1e9
            extra = ""
            if tile:
                pixels = sum((c[1] - c[0]) * (c[3] - c[2]) for _, c in tiles(args.lr_size, args.lr_size, tile, pad))
                extra = (f"; {seconds / base - 1:+.0%} time vs untiled "
                         f"({pixels / args.lr_size ** 2 - 1:+.0%} LR pixels computed)")
            print(f"{name:28s}: {seconds:6.2f} s/slice, {1 / seconds:5.2f} slices/s, {gflops:6.1f} GFLOP/s "
                  f"(useful work) = {gflops / peak:5.1%} of peak{extra}")
        for name, tile, pad in modes:
            child = subprocess.run([sys.executable, __file__, "--lr-size", str(args.lr_size), "--memory-child",
                                    str(path), str(tile), str(pad)], capture_output=True, text=True)
            lines = child.stdout.strip().splitlines()
            if child.returncode == 0 and lines:
                print(f"peak memory, one slice, {name:15s}: {float(lines[-1]):7.0f} MiB (resident)")
            else:
                print(f"memory measurement failed ({name}): {child.stderr.strip().splitlines()[-1:]}")


if __name__ == "__main__":
    main()
