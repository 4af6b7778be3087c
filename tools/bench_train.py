"""Benchmark training steps of the paper network on this machine.

    python tools/bench_train.py [--batch 2] [--lr-size 32] [--steps 3] [--memory-batch 16]

Prints, for the paper configuration (23 RRDB blocks, 64/32 channels):
- the single-precision matrix-multiply peak measured here (GFLOP/s), the baseline;
- generator-only (L1) training steps: patches/s, achieved GFLOP/s, fraction of peak;
- full GAN steps (G + D + VGG19 perceptual loss): patches/s and achieved GFLOP/s
  counting the generator's work only (a lower bound);
- peak resident memory of one GAN step at --memory-batch (paper: 16), measured in
  a separate process.

The generator costs about 36 MFLOP per LR pixel forward
(`tfgan_ct.generator.flops_per_lr_pixel`); a training step is counted as 3x.
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def numpy_matmul_peak(n: int = 2048, seconds: float = 3.0) -> float:
    """Sustained float32 GFLOP/s of an n x n matrix multiply in NumPy (its BLAS)."""
    import numpy as np

    a = np.random.rand(n, n).astype(np.float32)
    b = np.random.rand(n, n).astype(np.float32)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n ** 3 * count / (time.perf_counter() - start) / 1e9


def matmul_peak(n: int = 2048, seconds: float = 3.0) -> float:
    """Sustained float32 GFLOP/s of an n x n matrix multiply in TensorFlow."""
    import tensorflow as tf

    a = tf.random.uniform((n, n))
    b = tf.random.uniform((n, n))
    step = tf.function(lambda: tf.reduce_sum(tf.matmul(a, b)))
    step()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step().numpy()
        count += 1
    return 2 * n ** 3 * count / (time.perf_counter() - start) / 1e9


def build(batch: int, lr_size: int, vgg_weights: str = "none"):
    """Paper-size GAN model and one fixed batch."""
    import numpy as np
    import tensorflow as tf

    from tfgan_ct.config import Config
    from tfgan_ct.discriminator import build_discriminator
    from tfgan_ct.gan import TransferGAN
    from tfgan_ct.generator import build_generator
    from tfgan_ct.vgg import build_feature_extractor

    cfg = Config()
    model = TransferGAN(build_generator(), build_discriminator(lr_size * 4),
                        build_feature_extractor(vgg_weights), cfg.train, global_batch=batch)
    model.build_optimizers()
    rng = np.random.default_rng(0)
    hr = rng.random((batch, lr_size * 4, lr_size * 4, 1)).astype("float32")
    lr = hr.reshape(batch, lr_size, 4, lr_size, 4, 1).mean(axis=(2, 4))
    return model, {"lr": tf.constant(lr), "hr": tf.constant(hr)}


def time_steps(model, batch, gan: bool, steps: int, jit: bool = False) -> float:
    """Seconds per train step (after one warm-up step that traces the function)."""
    import tensorflow as tf

    model.gan_phase = gan
    step = tf.function(model.train_step, jit_compile=jit)
    step(batch)
    start = time.perf_counter()
    for _ in range(steps):
        out = step(batch)
    float(out["g_loss"][0])
    return (time.perf_counter() - start) / steps


def memory_mode(batch: int, lr_size: int) -> None:
    """Child process: one GAN step, then print peak RSS in MiB."""
    model, data = build(batch, lr_size)
    time_steps(model, data, gan=True, steps=1)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lr-size", type=int, default=32, help="LR patch edge (HR = 4x)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--memory-batch", type=int, default=16)
    parser.add_argument("--jit", action="store_true", help="compile the steps with XLA")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        memory_mode(args.memory_batch, args.lr_size)
        return

    from tfgan_ct.generator import flops_per_lr_pixel

    tf_peak, np_peak = matmul_peak(), numpy_matmul_peak()
    peak = max(tf_peak, np_peak)  # fractions are taken of the higher one
    model, batch = build(args.batch, args.lr_size)
    pixels = args.batch * args.lr_size ** 2
    train_flop = 3 * flops_per_lr_pixel() * pixels
    print(f"{os.cpu_count()} core(s); batch {args.batch} of LR {args.lr_size}x{args.lr_size} "
          f"(HR {4 * args.lr_size}); paper network (23 RRDB, 64/32)")
    print(f"matrix-multiply peak (float32, 2048^2)   : {tf_peak:7.1f} GFLOP/s TensorFlow, "
          f"{np_peak:.1f} GFLOP/s NumPy; fractions below are of {peak:.1f}")
    for name, gan in (("generator-only (L1) step", False), ("full GAN step (G+D+VGG19) ", True)):
        seconds = time_steps(model, batch, gan, args.steps, args.jit)
        gflops = train_flop / seconds / 1e9
        note = " (G work only)" if gan else ""
        print(f"{name}               : {seconds:6.2f} s/step, {args.batch / seconds:6.2f} patches/s, "
              f"{gflops:6.1f} GFLOP/s{note} = {gflops / peak:5.1%} of peak")
    child = subprocess.run([sys.executable, __file__, "--memory-child", "--memory-batch",
                            str(args.memory_batch), "--lr-size", str(args.lr_size)],
                           capture_output=True, text=True)
    if child.returncode == 0:
        print(f"peak memory, one GAN step at batch {args.memory_batch}  : "
              f"{float(child.stdout.strip().splitlines()[-1]):7.0f} MiB (resident)")
    else:
        print(f"memory measurement failed: {child.stderr.strip().splitlines()[-1:]}")


if __name__ == "__main__":
    main()
