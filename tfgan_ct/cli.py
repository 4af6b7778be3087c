"""The `tfgan-ct` command line."""
from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path

import click

from tfgan_ct.version import __version__


class _TqdmHandler(logging.Handler):
    """Log lines that do not break progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def setup_logging(verbosity: int) -> None:
    """Log to stderr: warnings and info by default, debug with -v, warnings only with -q."""
    level = logging.DEBUG if verbosity > 0 else logging.WARNING if verbosity < 0 else logging.INFO
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(levelname).1s %(message)s"))
    root = logging.getLogger("tfgan_ct")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def config_options(fn):
    """--config FILE and --set key=value, shared by every command."""
    @click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
                  help="YAML configuration (default: the paper's settings).")
    @click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                  help="Override one setting, e.g. --set convert.patch_size=64 (repeatable).")
    @functools.wraps(fn)
    def wrapper(*args, config_file=None, overrides=(), **kwargs):
        from tfgan_ct.config import ConfigError, load_config

        try:
            cfg = load_config(config_file, overrides)
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from None
        return fn(*args, cfg=cfg, **kwargs)
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="tfgan-ct")
@click.option("-v", "--verbose", count=True, help="More log output.")
@click.option("-q", "--quiet", is_flag=True, help="Warnings and errors only.")
def main(verbose: int, quiet: bool) -> None:
    """Transfer-GAN x4 super-resolution for stroke-protocol brain CT (NCCT, CTP, CTA)."""
    setup_logging(-1 if quiet else verbose)


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output dataset folder.")
@click.option("--modality", type=click.Choice(["auto", "ncct", "ctp", "cta"]), default="auto",
              show_default=True, help="Force a modality, or decide per series from the headers.")
@click.option("--split", default=None, metavar="T:V:T",
              help="Patients per train:validation:test, counts or fractions (config default 4:2:3).")
@click.option("--split-csv", type=click.Path(exists=True, dir_okay=False),
              help="CSV with columns patient,split (patient = DICOM PatientID) instead of --split.")
@click.option("--seed", type=int, default=None, help="Seed of the patient split (config default 0).")
@click.option("--workers", type=int, default=None, help="Worker processes (default: all cores).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@config_options
def convert(inputs, out, modality, split, split_csv, seed, workers, overwrite, no_progress, cfg):
    """Convert DICOM files, folders and DICOMDIRs into TFRecord shards.

    Train shards hold masked HR/LR patches, validation and test shards whole
    slices; OUT/manifest.json describes the dataset, OUT/config.yaml holds the
    settings used and OUT/convert.log what happened.
    """
    from tfgan_ct.config import ConfigError
    from tfgan_ct.convert import ConvertError, convert as run

    if split is not None:
        cfg.convert.split = split
    if seed is not None:
        cfg.convert.seed = seed
    try:
        summary = run(inputs, out, cfg, modality=modality, split_csv=split_csv, workers=workers,
                      overwrite=overwrite, progress=not no_progress)
    except (ConvertError, ConfigError) as exc:
        raise click.ClickException(str(exc)) from None
    n = sum(summary.records.values())
    click.echo(f"wrote {n} record(s) from {sum(summary.slices.values())} slice(s) to {out} "
               f"({len(summary.skipped)} file(s) skipped)")


@main.command("convert-images")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output dataset folder.")
@click.option("--split", default=None, metavar="T:V:T",
              help="Images per train:validation:test, counts or fractions (config default 4:2:3).")
@click.option("--split-csv", type=click.Path(exists=True, dir_okay=False),
              help="CSV with columns patient,split (patient = image path relative to its input "
                   "folder, e.g. train/0001.png) instead of --split.")
@click.option("--seed", type=int, default=None, help="Seed of the image split (config default 0).")
@click.option("--workers", type=int, default=None, help="Worker processes (default: all cores).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@config_options
def convert_images(inputs, out, split, split_csv, seed, workers, overwrite, no_progress, cfg):
    """Convert folders of PNG/JPEG/BMP/TIFF images into shards for the natural stage.

    Each image becomes its BT.601 luma (grey level x 1000 stored; alpha
    composited on black) and is its own "patient" in the split. Train shards
    hold HR/LR patches, validation and test shards whole images; the output
    folder looks like the one `tfgan-ct convert` makes, with modality natural.
    """
    from tfgan_ct.config import ConfigError
    from tfgan_ct.convert import ConvertError
    from tfgan_ct.images import convert_images as run

    if split is not None:
        cfg.convert.split = split
    if seed is not None:
        cfg.convert.seed = seed
    try:
        summary = run(inputs, out, cfg, split_csv=split_csv, workers=workers, overwrite=overwrite,
                      progress=not no_progress)
    except (ConvertError, ConfigError) as exc:
        raise click.ClickException(str(exc)) from None
    n = sum(summary.records.values())
    click.echo(f"wrote {n} record(s) from {sum(summary.slices.values())} image(s) to {out} "
               f"({len(summary.skipped)} file(s) skipped)")


@main.command()
@click.option("--stage", required=True, type=click.Choice(["natural", "ncct", "ctp", "cta"]),
              help="Stage of the chain natural -> ncct -> ctp -> cta.")
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Dataset folder made by `tfgan-ct convert` (or convert-images).")
@click.option("--warm-start", default="default", show_default=True, metavar="STAGE[@N]|PATH|none",
              help="Export to start from; default: the stage before (natural: none).")
@click.option("--models-dir", default="saved_models", show_default=True, type=click.Path(file_okay=False),
              help="Where stage exports are read and written.")
@click.option("--runs-dir", default="runs", show_default=True, type=click.Path(file_okay=False),
              help="Where runs keep checkpoints, TensorBoard logs and train.log.")
@click.option("--gpus", type=int, default=None, help="Use at most this many GPUs (default: all visible).")
@click.option("--restart", is_flag=True, help="Discard this run's checkpoints and train from the start.")
@config_options
def train(stage, data_dir, warm_start, models_dir, runs_dir, gpus, restart, cfg):
    """Train one stage (L1 phase, then GAN phase) and export it as a SavedModel.

    The same command run again resumes from the run's newest checkpoint.
    Several GPUs are used with MirroredStrategy; several machines with
    MultiWorkerMirroredStrategy when TF_CONFIG names several workers.
    """
    from tfgan_ct.export import ExportError
    from tfgan_ct.train import TrainingError, choose_strategy, train_stage

    try:
        result = train_stage(stage, data_dir, cfg, warm_start=warm_start, models_dir=models_dir,
                             runs_dir=runs_dir, strategy=choose_strategy(gpus), restart=restart)
    except (TrainingError, ExportError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{stage}: {result.steps} steps; run {result.run_dir}; export {result.export_dir}")


if __name__ == "__main__":  # pragma: no cover
    main()
