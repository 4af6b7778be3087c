"""Which weights to export: the last step, the moving average (EMA) or the best validated, measured.

    python tools/bench_weights.py [--out /tmp/bench-weights] [--patients 6] [--gan-steps 150]
                                  [--eval-every 15] [--eval-slices 8] [--ema-decay 0.98]

Trains on the quickstart's data (synthetic head study, scikit-image photographs)
with `configs/quickstart.yaml`, except for a longer GAN phase (--gan-steps; the
quickstart's 10 steps leave nothing to choose from), validation every
--eval-every steps on --eval-slices slices, and the moving average's decay
(--ema-decay; the quickstart runs are a few hundred steps, so BasicSR's 0.999
would still be mostly the warm start's weights at the end).

To stay within about half an hour on two CPU cores, `natural` and `ncct` are
trained once with the unchanged quickstart config and shared; then, for each of
`train.export_weights=last`, `ema` and `best`, the chain ctp -> cta is trained
from that shared ncct export, each stage warm-started from the weights its
variant exported. The three variants train identically (same seeds, same
batches); only what they export, and so what the next stage starts from, differs.

Prints, for CTP and CTA, PSNR/SSIM in the brain mask on the test slices (mean,
variance) of each variant with the one-tailed paired t-test of `tfgan-ct
evaluate` against `last`, and which step each variant exported with its
validation PSNR.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

VARIANTS = ("last", "ema", "best")
MODALITIES = ("ctp", "cta")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="/tmp/bench-weights")
    parser.add_argument("--patients", type=int, default=6)
    parser.add_argument("--gan-steps", type=int, default=150)
    parser.add_argument("--eval-every", type=int, default=15)
    parser.add_argument("--eval-slices", type=int, default=8)
    parser.add_argument("--ema-decay", type=float, default=0.98)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)  # runs' train.log: all
    logging.getLogger().handlers[0].setLevel(logging.WARNING)                           # terminal: warnings

    from tfgan_ct.config import load_config
    from tfgan_ct.data import convert, images
    from tfgan_ct.demo import phantom
    from tfgan_ct.demo.sample_images import write_sample_images
    from tfgan_ct.deploy import export, inference
    from tfgan_ct.evaluation import evaluate
    from tfgan_ct.training.train import train_stage

    out, t0 = Path(args.out), time.perf_counter()
    overrides = [f"train.gan_phase.steps={args.gan_steps}", f"train.eval_every={args.eval_every}",
                 f"train.eval_slices={args.eval_slices}", f"train.ema_decay={args.ema_decay}"]
    cfg = load_config("quickstart", overrides)
    print(f"quickstart config with {' '.join(overrides)}; per stage {cfg.train.l1_phase.steps} L1 + "
          f"{cfg.train.gan_phase.steps} GAN steps, batch {cfg.data.batch_size}", flush=True)
    if not (out / "data/ct/manifest.json").is_file():
        phantom.make_dataset(out / "phantom", n_patients=args.patients, seed=cfg.convert.seed, size=128, workers=2)
        convert.convert([out / "phantom"], out / "data/ct", cfg, progress=False)
        images.convert_images([out / "natural-images"] if write_sample_images(out / "natural-images") else [],
                              out / "data/natural", cfg, progress=False)
    shared, base = out / "shared_models", load_config("quickstart")  # the parent: as the quickstart trains it
    train_stage("natural", out / "data/natural", base, models_dir=shared, runs_dir=out / "runs")
    parent = train_stage("ncct", out / "data/ct", base, models_dir=shared, runs_dir=out / "runs").export_dir
    print(f"shared parent: {parent} ({time.perf_counter() - t0:.0f} s)", flush=True)

    exported: dict[str, dict[str, Path]] = {v: {} for v in VARIANTS}
    for variant in VARIANTS:
        vcfg = load_config("quickstart", [*overrides, f"train.export_weights={variant}"])
        source = str(parent)
        for stage in MODALITIES:
            result = train_stage(stage, out / "data/ct", vcfg, warm_start=source, models_dir=out / variant,
                                 runs_dir=out / "runs")
            exported[variant][stage] = result.export_dir
            source = str(result.export_dir)
            meta = export.read_metadata(result.export_dir)
            psnr = (meta["exported_validation"] or {}).get("psnr_mask", float("nan"))
            print(f"{variant:4s} {stage}: exported {meta['exported_weights']} weights of step "
                  f"{meta['exported_step']}/{meta['steps']}, validation PSNR {psnr:.2f} dB in the mask "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)

    print()
    for stage in MODALITIES:
        methods = [inference.load(f"{v}={exported[v][stage]}") for v in VARIANTS]
        slices = evaluate.load_slices(out / "data/ct", stage, cfg)
        results = evaluate.evaluate(methods, slices, stage, progress=False)
        table = evaluate.summarize(results, "last")
        print(evaluate.markdown(table))
        for variant in VARIANTS[1:]:
            parts = []
            for metric, digits in (("psnr", 3), ("ssim", 4)):
                ours, last = results.scores(variant, metric), results.scores("last", metric)
                parts.append(f"{metric.upper()} {ours.mean() - last.mean():+.{digits}f} (p better "
                             f"{evaluate.paired_p_value(ours, last):.3g}, p worse "
                             f"{evaluate.paired_p_value(last, ours):.3g})")
            print(f"  {variant} - last: " + ", ".join(parts))
        print()
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
