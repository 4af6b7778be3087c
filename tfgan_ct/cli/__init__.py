"""The `tfgan-ct` command line (`tfgan_ct.cli.pacs` holds the PACS command)."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from tfgan_ct.cli.options import AUTO_TILE_OPTION, TILE_PAD_OPTION, config_options
from tfgan_ct.stages import CT_MODALITIES, NATURAL, STAGES
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


def error_message(exc: Exception) -> str | None:
    """The one-line message for an error a command ended with; None for a programming
    error, which keeps its traceback. The package's own errors (TfganError) say what
    is wrong; a full disk and other operating-system errors are named with their file."""
    from tfgan_ct.errors import TfganError
    from tfgan_ct.fileio import is_disk_full

    if isinstance(exc, TfganError):
        return str(exc)
    if is_disk_full(exc):
        where = getattr(exc, "filename", None)
        return (f"disk full{f' writing {where}' if where else ''}: nothing half-written was kept; "
                f"free some space and run the command again")
    if isinstance(exc, OSError):
        return f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else str(exc)
    return None


class _Commands(click.Group):
    """The command group; errors of any command are turned into one line here, once."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:  # noqa: BLE001 - translated below, or re-raised
            message = error_message(exc)
            if message is None:
                raise
            raise click.ClickException(message) from None


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="tfgan-ct")
@click.option("-v", "--verbose", count=True, help="More log output.")
@click.option("-q", "--quiet", is_flag=True, help="Warnings and errors only.")
def main(verbose: int, quiet: bool) -> None:
    """Transfer-GAN x4 super-resolution for stroke-protocol brain CT (NCCT, CTP, CTA)."""
    setup_logging(-1 if quiet else verbose)


def _split_options(units: str, unit: str, csv_key: str):
    """--split, --split-csv and --seed of a convert command: `units` ("patients") are split,
    a `unit` split ("patient") is seeded, and the CSV's patient column holds `csv_key`."""
    def decorate(fn):
        fn = click.option("--seed", type=int, default=None,
                          help=f"Seed of the {unit} split (config default 0).")(fn)
        fn = click.option("--split-csv", type=click.Path(exists=True, dir_okay=False),
                          help=f"CSV with columns patient,split (patient = {csv_key}) instead of --split.")(fn)
        return click.option("--split", default=None, metavar="T:V:T",
                            help=f"{units.capitalize()} per train:validation:test, counts or fractions "
                                 f"(config default 4:2:3).")(fn)
    return decorate


def _apply_split(cfg, split: str | None, seed: int | None) -> None:
    """--split and --seed of the two convert commands, over the config's values."""
    if split is not None:
        cfg.convert.split = split
    if seed is not None:
        cfg.convert.seed = seed
    cfg.validate()  # a ConfigError names --split's key and value


def _report_dataset(summary, out, unit: str) -> None:
    """The last line of a convert command: records, `unit`s (slice, image) and skipped files."""
    click.echo(f"wrote {sum(summary.records.values())} record(s) from {sum(summary.slices.values())} "
               f"{unit}(s) to {out} ({len(summary.skipped)} file(s) skipped)")


def _conversion_options(fn):
    """--workers, --overwrite and --no-progress, shared by the two convert commands."""
    fn = click.option("--no-progress", is_flag=True, help="No progress bars.")(fn)
    fn = click.option("--overwrite", is_flag=True, help="Replace an existing dataset made by tfgan-ct "
                      "(never a folder holding an input or other files).")(fn)
    return click.option("--workers", type=click.IntRange(min=1), default=None,
                        help="Worker processes (default: all cores).")(fn)


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output dataset folder.")
@click.option("--modality", type=click.Choice(["auto", *CT_MODALITIES]), default="auto",
              show_default=True, help="Force a modality, or decide per series from the headers.")
@_split_options("patients", "patient", "DICOM PatientID; NIfTI: BIDS sub- folder, sidecar PatientID, "
                "case folder or file name")
@click.option("--runner", type=click.Choice(["local", "beam"]), default="local", show_default=True,
              help="local: this machine's cores; beam: an Apache Beam pipeline (needs tfgan-ct[beam]).")
@click.option("--beam-options", default=None, metavar="'--opt=value ...'",
              help="Beam pipeline options for --runner beam, e.g. '--runner=FlinkRunner --flink_master=HOST:8081' "
                   "(default: DirectRunner, multi-process, --workers processes).")
@_conversion_options
@config_options
def convert(inputs, out, modality, split, split_csv, seed, runner, beam_options, workers, overwrite, no_progress,
            cfg):
    """Convert DICOM files, folders and DICOMDIRs, and NIfTI volumes, into TFRecord shards.

    NIfTI (.nii, .nii.gz) may be mixed with DICOM: a 3-D volume is one series
    (NCCT unless its JSON sidecar or --modality says otherwise), a 4-D one CT
    perfusion. Train shards hold masked HR/LR patches, validation and test shards whole
    slices; OUT/manifest.json describes the dataset, OUT/config.yaml holds the
    settings used and OUT/convert.log what happened.
    """
    _apply_split(cfg, split, seed)
    if runner == "beam":
        from tfgan_ct.data.beam_conversion import convert_with_beam

        summary = convert_with_beam(inputs, out, cfg, modality=modality, split_csv=split_csv,
                                    beam_options=beam_options or "", workers=workers, overwrite=overwrite,
                                    progress=not no_progress)
    else:
        from tfgan_ct.data.convert import convert as run

        if beam_options is not None:
            raise click.UsageError("--beam-options needs --runner beam")
        summary = run(inputs, out, cfg, modality=modality, split_csv=split_csv, workers=workers,
                      overwrite=overwrite, progress=not no_progress)
    _report_dataset(summary, out, "slice")


@main.command("convert-images")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output dataset folder.")
@_split_options("images", "image", "image path relative to its input folder, e.g. train/0001.png")
@_conversion_options
@config_options
def convert_images(inputs, out, split, split_csv, seed, workers, overwrite, no_progress, cfg):
    """Convert folders of PNG/JPEG/BMP/TIFF images into shards for the natural stage.

    Each image becomes its BT.601 luma (grey level x 1000 stored; alpha
    composited on black) and is its own "patient" in the split. Train shards
    hold HR/LR patches, validation and test shards whole images; the output
    folder looks like the one `tfgan-ct convert` makes, with modality natural.
    """
    from tfgan_ct.data.images import convert_images as run

    _apply_split(cfg, split, seed)
    summary = run(inputs, out, cfg, split_csv=split_csv, workers=workers, overwrite=overwrite,
                  progress=not no_progress)
    _report_dataset(summary, out, "image")


@main.command()
@click.option("--stage", required=True, type=click.Choice(STAGES),
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
    from tfgan_ct.training.distribute import choose_strategy
    from tfgan_ct.training.train import train_stage

    result = train_stage(stage, data_dir, cfg, warm_start=warm_start, models_dir=models_dir,
                         runs_dir=runs_dir, strategy=choose_strategy(gpus), restart=restart)
    from tfgan_ct.deploy.layout import read_metadata

    meta = read_metadata(result.export_dir)
    chosen = f" ({meta['exported_weights']} weights of step {meta['exported_step']})" \
        if meta.get("exported_weights") else ""
    click.echo(f"{stage}: {result.steps} steps; run {result.run_dir}; export {result.export_dir}{chosen}")


def _window_option(value: str | None):
    """--window C,W as a Window (None when not given)."""
    if value is None:
        return None
    from tfgan_ct.config import Window

    try:
        center, width = (float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected CENTER,WIDTH in HU, e.g. 40,80; got {value!r}") from None
    if width <= 0:
        raise click.BadParameter(f"window width must be positive, got {width:g}")
    return Window(center, width)


def _load_methods(specs, models_dir, server=None):
    from tfgan_ct.deploy.inference import load

    return [load(spec, models_dir, server) for spec in specs]


def _test_slices(data_dir, modality, split, limit, cfg):
    from tfgan_ct.evaluation.evaluate import load_slices, only_modality

    modality = modality or only_modality(data_dir, split)
    slices = load_slices(data_dir, modality, cfg, split, limit)
    if not slices:
        raise click.ClickException(f"{data_dir}: no {split} slices of modality {modality}")
    return modality, slices


_MODELS_DIR = click.option("--models-dir", default="saved_models", show_default=True,
                           type=click.Path(file_okay=False), help="Where stage exports are read.")
_TILE = click.option("--tile", type=click.IntRange(min=0), default=0, show_default=True,
                     help="LR tile size for tiled inference (0: whole image at once).")
_SPLIT = click.option("--split", type=click.Choice(["test", "validation"]), default="test",
                      show_default=True, help="Which slices of the dataset to use.")
_METHODS = click.argument("methods", nargs=-1, required=True)
_DATA = click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False),
                     help="Dataset folder made by `tfgan-ct convert`.")
_MODALITY = click.option("--modality", type=click.Choice([*CT_MODALITIES, NATURAL]), default=None,
                         help="Modality of the slices (default: the only one the split holds).")


@main.command()
@_METHODS
@_DATA
@click.option("--out", default="evaluation", show_default=True, type=click.Path(file_okay=False),
              help="Folder for per_slice.csv, table.md, table.json and evaluate.log.")
@click.option("--baseline", default="bicubic", show_default=True,
              help="Method the others are tested against (one of METHODS; bicubic is always added).")
@click.option("--alpha", type=float, default=0.05, show_default=True, help="Significance level.")
@click.option("--limit", type=int, default=None, help="Score only the first N slices.")
@click.option("--server", default=None, metavar="URL",
              help="Ask TensorFlow Serving (grpc://HOST:8500 or http://HOST:8501) for stage names instead of "
                   "loading them.")
@_MODALITY
@_SPLIT
@_MODELS_DIR
@_TILE
@TILE_PAD_OPTION
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--no-card", is_flag=True, help="Do not write the table into the evaluated exports' MODEL_CARD.md.")
@config_options
def evaluate(methods, data_dir, out, baseline, alpha, limit, server, modality, split, models_dir, tile,
             tile_pad, no_progress, no_card, cfg):
    """Score METHODS on the test slices: PSNR/SSIM per slice, Table 1 with paired t-tests.

    METHODS are stage names (newest export), stage@VERSION, SavedModel folders,
    or `bicubic`. Metrics are computed on the [0, 1] windowed slices inside the
    brain mask, and over the whole slice as a second figure.
    """
    from tfgan_ct.deploy.inference import BICUBIC
    from tfgan_ct.evaluation.evaluate import check_windows, markdown, summarize, update_model_cards, write_outputs
    from tfgan_ct.evaluation.evaluate import evaluate as run
    from tfgan_ct.logs import log_to_file

    specs = list(dict.fromkeys([BICUBIC, *methods]))
    modality, slices = _test_slices(data_dir, modality, split, limit, cfg)
    Path(out).mkdir(parents=True, exist_ok=True)
    with log_to_file(Path(out) / "evaluate.log"):
        loaded = _load_methods(specs, models_dir, server)
        check_windows(loaded, cfg.modalities.get(modality).window, modality)
        results = run(loaded, slices, modality, split, tile, tile_pad, progress=not no_progress)
        table = summarize(results, baseline, alpha)
        paths = write_outputs(results, table, out)
        cfg.save(Path(out) / "config.yaml")
        if not no_card and split == "test":
            update_model_cards(loaded, table, data_dir)
    click.echo(markdown(table))
    click.echo(f"per-slice scores: {paths['csv']}; table: {paths['markdown']}, {paths['json']}")


@main.command()
@_METHODS
@_DATA
@click.option("--out", default="compare.png", show_default=True, type=click.Path(dir_okay=False),
              help="PNG file to write.")
@click.option("--slices", "indices", default=None, metavar="I,J,...",
              help="Positions of the slices in the split (default: those with most brain).")
@click.option("--count", type=int, default=2, show_default=True, help="Slices to show without --slices.")
@click.option("--roi", default=None, metavar="Y,X,SIZE",
              help="Region to enlarge, HR pixels (default: where the methods differ most).")
@click.option("--panel", type=int, default=320, show_default=True, help="Panel size in screen pixels.")
@_MODALITY
@_SPLIT
@_MODELS_DIR
@_TILE
@TILE_PAD_OPTION
@config_options
def compare(methods, data_dir, out, indices, count, roi, panel, modality, split, models_dir, tile, tile_pad,
            cfg):
    """Figure in the style of the paper's Figure 2: bicubic, METHODS, ground truth, zoomed region."""
    from tfgan_ct.evaluation.compare import compare as make
    from tfgan_ct.evaluation.compare import save_png
    from tfgan_ct.evaluation.evaluate import check_windows

    try:
        index_list = [int(v) for v in indices.split(",")] if indices else None
        region = tuple(int(v) for v in roi.split(",")) if roi else None
    except ValueError:
        raise click.BadParameter("--slices and --roi take comma-separated integers") from None
    if region is not None and len(region) != 3:
        raise click.BadParameter("--roi takes Y,X,SIZE")
    modality, slices = _test_slices(data_dir, modality, split, None, cfg)
    loaded = _load_methods([m for m in methods if m != "bicubic"], models_dir)
    check_windows(loaded, cfg.modalities.get(modality).window, modality)
    try:
        image = make(slices, loaded, count, index_list, region, panel, tile, tile_pad)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_png(image, out)
    click.echo(f"wrote {out} ({image.width}x{image.height})")


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--model", "spec", default="ncct", show_default=True, metavar="STAGE[@N]|PATH",
              help="Export to run (newest version of a stage, a version, or a SavedModel folder).")
@click.option("--server", default=None, metavar="URL",
              help="TensorFlow Serving serving --model: grpc://HOST:8500 (gRPC) or http://HOST:8501 (REST).")
@click.option("--format", "fmt", type=click.Choice(["auto", "dicom", "png", "npy", "nifti"]), default="auto",
              show_default=True, help="DICOM series, windowed 8-bit PNGs, a float32 HU array or one x4 NIfTI "
                                      "volume per series; auto: DICOM for DICOM input, NIfTI for NIfTI input.")
@click.option("--window", default=None, metavar="C,W",
              help="HU window of the model (default: its export's; with --server, the config's for the stage).")
@click.option("--outside-window", type=click.Choice(["bicubic", "clip"]), default="bicubic",
              show_default=True, help="Pixels outside the window: bicubic HU, or the model clipped.")
@_MODELS_DIR
@AUTO_TILE_OPTION
@TILE_PAD_OPTION
@click.option("--overwrite", is_flag=True,
              help="Replace series folders this command wrote (never one holding an input or other files).")
@click.option("--uncertainty", is_flag=True,
              help="Also write a flip-spread series <folder>_spread (HU): where the model is unsure (8x the "
                   "inference; DICOM only).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@config_options
def upscale(inputs, out, spec, server, fmt, window, outside_window, models_dir, tile, tile_pad, overwrite,
            uncertainty, no_progress, cfg):
    """Super-resolve DICOM series and NIfTI volumes x4 into new DICOM series (or PNG / npy / NIfTI).

    The DICOM output keeps the source's patient and study, with new series and
    instance UIDs, DERIVED image type, 4x rows and columns and PixelSpacing / 4.
    Each image's LR consistency (HU) is in its ImageComments and, per series,
    in trust_report.json in --out. A NIfTI volume becomes <name>_x4.nii.gz
    (int16 HU, in-plane voxel size / 4, the affine keeping the anatomy in place).
    """
    from tfgan_ct.deploy.upscale import upscale as run

    method = _load_methods([spec], models_dir, server)[0]
    if server and window is None:
        logging.getLogger("tfgan_ct.deploy.upscale").warning(
            "--server: the served model's HU window is not known here; using the config's window for "
            "stage %r. Pass --window C,W if the model was trained with another one", method.metadata["stage"])
    summary = run(inputs, out, method, cfg, fmt, _window_option(window), outside_window, tile, tile_pad,
                  overwrite, progress=not no_progress, uncertainty=uncertainty)
    click.echo(f"wrote {summary.images} image(s) in {len(summary.series)} series to {out} "
               f"({len(summary.skipped)} file(s) skipped)")


@main.group()
def serve() -> None:
    """TensorFlow Serving: write models.config, or run a local stand-in for tests and demos."""


@serve.command("config")
@click.option("--models-dir", default="saved_models", show_default=True, type=click.Path(file_okay=False),
              help="Folder of <stage>/<version>/ exports.")
@click.option("--base-path", default=None,
              help="Model path prefix as the server sees it, e.g. /models (default: absolute local path).")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="Write here instead of printing.")
def serve_config(models_dir, base_path, out):
    """Print or write models.config (one model per exported stage).

    The file TensorFlow Serving reads with --model_config_file; each stage is
    served at its newest version. TensorFlow is not loaded.
    """
    from tfgan_ct.deploy.serving.artefacts import models_config, write_models_config

    if out:
        write_models_config(models_dir, base_path, out)
        click.echo(f"wrote {out}")
    else:
        click.echo(models_config(models_dir, base_path), nl=False)


@serve.command("standin")
@click.option("--models-dir", default="saved_models", show_default=True, type=click.Path(file_okay=False),
              help="Folder of <stage>/<version>/ exports; the newest version of each stage is served.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=int, default=8501, show_default=True, help="REST port (0: any free one).")
@click.option("--grpc-port", type=int, default=8500, show_default=True,
              help="gRPC port (0: any free one, -1: no gRPC).")
def serve_standin(models_dir, host, port, grpc_port):
    """Run a local STAND-IN REST server (tests and demos only).

    Answers TensorFlow Serving's REST and gRPC Predict/GetModelStatus requests
    from the newest export of each stage. It is not TensorFlow Serving: no
    batching, warm-up, version policies or hot reload; deploy with the
    tensorflow/serving image.
    """
    from tfgan_ct.deploy.serving import standin

    server = standin.make_standin(models_dir, host, port, quiet=False, grpc_port=None if grpc_port < 0 else grpc_port)
    standin.serve(server, click.echo)


@main.command()
@click.option("--out", default="quickstart", show_default=True, type=click.Path(file_okay=False),
              help="Folder for everything the quickstart makes.")
@click.option("--patients", type=int, default=6, show_default=True, help="Synthetic patients (split 4:1:1).")
@click.option("--overwrite", is_flag=True,
              help="Empty --out first if it holds an earlier quickstart (other folders are refused).")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@click.option("--config", "config_file", metavar="FILE|NAME", default=None,
              help="YAML configuration, or a bundled one by name (default: the bundled quickstart).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override one setting.")
def quickstart(out, patients, overwrite, no_progress, config_file, overrides):
    """The whole chain on built-in data: phantom + sample photographs -> natural -> NCCT -> CTP -> CTA.

    Converts, trains every stage and its Scratch baseline with a small
    configuration, evaluates against bicubic and Scratch, draws a figure and
    upscales a DICOM series; a few minutes on two CPU cores, no network.
    """
    from tfgan_ct.config import bundled_config, load_config
    from tfgan_ct.demo.quickstart import run, summary_lines

    cfg = load_config(config_file or bundled_config("quickstart"), overrides)
    result = run(out, cfg, patients=patients, overwrite=overwrite, progress=not no_progress)
    click.echo("\n".join(summary_lines(result)))


from tfgan_ct.cli.pacs import pacs  # noqa: E402 - registered once the group exists

main.add_command(pacs)
