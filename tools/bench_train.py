"""Benchmark training steps of the paper network on this machine.

    python tools/bench_train.py [--batch 2] [--lr-size 32] [--steps 2] [--rounds 3] [--memory-batch 16] [--plain]

Prints, for the paper configuration (23 RRDB blocks, 64/32 channels):
- the single-precision matrix-multiply peak measured here (GFLOP/s), the baseline;
- the ceiling the convolutions themselves set: the wide dense-block
  convolutions of this network alone (forward, input and filter gradients),
  run by TensorFlow at the step's batch and patch size;
- generator-only (L1) training steps: patches/s, achieved GFLOP/s, fraction of
  the peak and of the convolution ceiling;
- full GAN steps (G + D + VGG19 perceptual loss): patches/s and achieved GFLOP/s
  counting the generator's work only (a lower bound);
- peak resident memory of one GAN step at --memory-batch (paper: 16), measured in
  a separate process;
- when PyTorch is installed (`pip install torch --index-url
  https://download.pytorch.org/whl/cpu`; a benchmark tool, not a dependency):
  the same generator-only step of the same network in PyTorch (BasicSR's
  RRDBNet: 23 blocks, 64/32, one channel; L1 loss, Adam), timed in the same
  interleaved rounds, and the ratio of the two speeds.

`--plain` measures the plain ESRGAN layers (`build_generator(fast=False)`)
instead of the default fused forms of `tfgan_ct.model.fast_layers`.

The generator costs about 36 MFLOP per LR pixel forward
(`tfgan_ct.model.generator.flops_per_lr_pixel`); a training step is counted as 3x.

Shared cores make single measurements swing by 10-30 %. So the peaks, the
convolution ceiling and the generator step are measured in --rounds
interleaved rounds, and each figure is the best of its rounds: every
measurement then has had the same chances of a quiet moment.
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def numpy_matmul_peak(n: int = 2048, seconds: float = 2.0) -> float:
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


def matmul_peak(n: int = 2048, seconds: float = 2.0) -> float:
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


def conv_ceiling(batch: int, lr_size: int, features: int = 64, growth: int = 32,
                 repeats: int = 3) -> float:
    """GFLOP/s of the dense blocks' wide convolutions alone: forward, input and filter
    gradient of the five 'by source' convolutions of one dense block (inputs of
    64, 32, 32, 32, 32 channels to 192, 160, 128, 96, 64) at LR resolution,
    best of `repeats` runs. No element-wise work, no optimizer: what TensorFlow's
    convolution kernels reach on these shapes."""
    import tensorflow as tf

    shapes = [(features if part == 0 else growth, growth * (4 - part) + features) for part in range(5)]
    tensors = [(tf.random.uniform((batch, lr_size, lr_size, c_in)), tf.random.uniform((3, 3, c_in, c_out)),
                tf.random.uniform((batch, lr_size, lr_size, c_out))) for c_in, c_out in shapes]

    @tf.function
    def run():
        total = tf.constant(0.0)
        for x, w, dy in tensors:
            y = tf.nn.conv2d(x, w, 1, "SAME")
            dx = tf.raw_ops.Conv2DBackpropInput(input_sizes=tf.shape(x), filter=w, out_backprop=dy,
                                                strides=[1, 1, 1, 1], padding="SAME")
            dw = tf.raw_ops.Conv2DBackpropFilter(input=x, filter_sizes=tf.shape(w), out_backprop=dy,
                                                 strides=[1, 1, 1, 1], padding="SAME")
            total += y[0, 0, 0, 0] + dx[0, 0, 0, 0] + dw[0, 0, 0, 0]
        return total

    flop = 3 * sum(2 * 9 * c_in * c_out * batch * lr_size ** 2 for c_in, c_out in shapes)
    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(5):
            run().numpy()
        best = min(best, (time.perf_counter() - start) / 5)
    return flop / best / 1e9


def build(batch: int, lr_size: int, vgg_weights: str = "none", fast: bool = True):
    """Paper-size GAN model (generator in its fused or plain form) and one fixed batch."""
    import numpy as np
    import tensorflow as tf

    from tfgan_ct.config import Config
    from tfgan_ct.model.discriminator import build_discriminator
    from tfgan_ct.model.gan import TransferGAN
    from tfgan_ct.model.generator import build_generator
    from tfgan_ct.model.vgg import build_feature_extractor

    cfg = Config()
    model = TransferGAN(build_generator(fast=fast), build_discriminator(lr_size * 4),
                        build_feature_extractor(vgg_weights), cfg.train, global_batch=batch)
    model.build_optimizers()
    rng = np.random.default_rng(0)
    hr = rng.random((batch, lr_size * 4, lr_size * 4, 1)).astype("float32")
    lr = hr.reshape(batch, lr_size, 4, lr_size, 4, 1).mean(axis=(2, 4))
    return model, {"lr": tf.constant(lr), "hr": tf.constant(hr)}


def step_function(model, batch, gan: bool, jit: bool = False):
    """The model's train step as a traced `tf.function` (traced here, by one step)."""
    import tensorflow as tf

    model.gan_phase = gan
    step = tf.function(model.train_step, jit_compile=jit)
    step(batch)
    return step


def time_steps(step, batch, steps: int) -> float:
    """Seconds per call of the traced train `step` over `steps` calls."""
    start = time.perf_counter()
    for _ in range(steps):
        out = step(batch)
    float(out["g_loss"][0])
    return (time.perf_counter() - start) / steps


def torch_step_function(batch: int, lr_size: int):
    """A PyTorch generator-only training step of the paper network (BasicSR's RRDBNet, L1, Adam)
    on one fixed batch, warmed up; None when torch is not installed."""
    try:
        import torch
        from torch import nn
    except ImportError:
        return None

    def conv(cin: int, cout: int) -> nn.Conv2d:
        return nn.Conv2d(cin, cout, 3, 1, 1)

    class RDB(nn.Module):
        def __init__(self, nf=64, gc=32):
            super().__init__()
            self.convs = nn.ModuleList([conv(nf + i * gc, gc) for i in range(4)] + [conv(nf + 4 * gc, nf)])
            self.act = nn.LeakyReLU(0.2, inplace=True)

        def forward(self, x):
            features = [x]
            for layer in self.convs[:4]:
                features.append(self.act(layer(torch.cat(features, 1))))
            return self.convs[4](torch.cat(features, 1)) * 0.2 + x

    class RRDB(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.Sequential(RDB(), RDB(), RDB())

        def forward(self, x):
            return self.blocks(x) * 0.2 + x

    class RRDBNet(nn.Module):
        def __init__(self, blocks=23, nf=64):
            super().__init__()
            self.conv_first, self.body = conv(1, nf), nn.Sequential(*[RRDB() for _ in range(blocks)])
            self.conv_body, self.up1, self.up2 = conv(nf, nf), conv(nf, nf), conv(nf, nf)
            self.conv_hr, self.conv_last = conv(nf, nf), conv(nf, 1)
            self.act = nn.LeakyReLU(0.2, inplace=True)

        def forward(self, x):
            x = self.conv_first(x)
            x = x + self.conv_body(self.body(x))
            x = self.act(self.up1(nn.functional.interpolate(x, scale_factor=2, mode="nearest")))
            x = self.act(self.up2(nn.functional.interpolate(x, scale_factor=2, mode="nearest")))
            return self.conv_last(self.act(self.conv_hr(x)))

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    net = RRDBNet()
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-4, betas=(0.9, 0.99))
    lr = torch.rand(batch, 1, lr_size, lr_size)
    hr = torch.rand(batch, 1, 4 * lr_size, 4 * lr_size)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.l1_loss(net(lr), hr)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    step()
    return step


def time_torch(step, steps: int) -> float:
    """Seconds per call of the PyTorch `step` over `steps` calls."""
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def memory_mode(batch: int, lr_size: int, fast: bool) -> None:
    """Child process: one GAN step, then print peak RSS in MiB."""
    model, data = build(batch, lr_size, fast=fast)
    step_function(model, data, gan=True)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lr-size", type=int, default=32, help="LR patch edge (HR = 4x)")
    parser.add_argument("--steps", type=int, default=2, help="generator steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--memory-batch", type=int, default=16)
    parser.add_argument("--jit", action="store_true", help="compile the steps with XLA")
    parser.add_argument("--plain", action="store_true", help="the plain ESRGAN layers, not the fused forms")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        memory_mode(args.memory_batch, args.lr_size, fast=not args.plain)
        return

    from tfgan_ct.model.generator import flops_per_lr_pixel

    model, batch = build(args.batch, args.lr_size, fast=not args.plain)
    pixels = args.batch * args.lr_size ** 2
    train_flop = 3 * flops_per_lr_pixel() * pixels
    print(f"{os.cpu_count()} core(s); batch {args.batch} of LR {args.lr_size}x{args.lr_size} "
          f"(HR {4 * args.lr_size}); paper network (23 RRDB, 64/32, {'plain' if args.plain else 'fused'} layers); "
          f"best of {args.rounds} rounds")
    g_step = step_function(model, batch, gan=False, jit=args.jit)
    torch_step = torch_step_function(args.batch, args.lr_size)
    best = {"tf": 0.0, "numpy": 0.0, "conv": 0.0, "step": float("inf"), "torch": float("inf")}
    for _ in range(args.rounds):  # interleaved, best of each (see the module docstring)
        best["tf"] = max(best["tf"], matmul_peak())
        best["numpy"] = max(best["numpy"], numpy_matmul_peak())
        best["conv"] = max(best["conv"], conv_ceiling(args.batch, args.lr_size))
        best["step"] = min(best["step"], time_steps(g_step, batch, args.steps))
        if torch_step is not None:
            best["torch"] = min(best["torch"], time_torch(torch_step, args.steps))
    peak = max(best["tf"], best["numpy"])  # fractions are taken of the higher one
    gflops = train_flop / best["step"] / 1e9
    print(f"matrix-multiply peak (float32, 2048^2)   : {best['tf']:7.1f} GFLOP/s TensorFlow, "
          f"{best['numpy']:.1f} GFLOP/s NumPy; fractions below are of {peak:.1f}")
    print(f"dense-block convolutions alone (ceiling) : {best['conv']:7.1f} GFLOP/s = {best['conv'] / peak:5.1%} "
          f"of peak")
    print(f"generator-only (L1) step               : {best['step']:6.2f} s/step, "
          f"{args.batch / best['step']:6.2f} patches/s, {gflops:6.1f} GFLOP/s = {gflops / peak:5.1%} of peak "
          f"({gflops / best['tf']:5.1%} of TensorFlow's matmul), {gflops / best['conv']:5.1%} of the "
          f"convolution ceiling")
    if torch_step is None:
        print("the same step in PyTorch                : torch not installed (pip install torch --index-url "
              "https://download.pytorch.org/whl/cpu)")
    else:
        import torch

        print(f"the same step in PyTorch {torch.__version__:14s}: {best['torch']:6.2f} s/step; tfgan-ct/PyTorch "
              f"speed ratio {best['torch'] / best['step']:.2f} (>= 1: tfgan-ct at least as fast)")
    gan_step = step_function(model, batch, gan=True, jit=args.jit)
    seconds = time_steps(gan_step, batch, args.steps)
    gflops = train_flop / seconds / 1e9
    print(f"full GAN step (G+D+VGG19)              : {seconds:6.2f} s/step, {args.batch / seconds:6.2f} "
          f"patches/s, {gflops:6.1f} GFLOP/s (G work only) = {gflops / peak:5.1%} of peak (one round)")
    child = subprocess.run([sys.executable, __file__, "--memory-child", "--memory-batch",
                            str(args.memory_batch), "--lr-size", str(args.lr_size),
                            *(["--plain"] if args.plain else [])],
                           capture_output=True, text=True)
    if child.returncode == 0:
        print(f"peak memory, one GAN step at batch {args.memory_batch}  : "
              f"{float(child.stdout.strip().splitlines()[-1]):7.0f} MiB (resident)")
    else:
        print(f"memory measurement failed: {child.stderr.strip().splitlines()[-1:]}")


if __name__ == "__main__":
    main()
