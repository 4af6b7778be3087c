"""`tfgan-ct quickstart`: the whole Transfer-GAN chain on built-in data, in minutes on a CPU.

Steps (everything under one output folder):

1. a synthetic multimodal head study (`tfgan_ct.demo.phantom`: NCCT, CTP, CTA for
   several patients) and scikit-image's bundled sample photographs;
2. both converted to shards (`data/ct`, `data/natural`);
3. the chain natural -> ncct -> ctp -> cta trained and exported to
   `saved_models/`, each stage warm-started from the one before, and the
   Scratch baselines (ncct, ctp, cta with no warm start) to `scratch_models/`;
4. each CT stage evaluated on the phantom's test slices against bicubic and
   its Scratch baseline (`evaluation/<modality>/`, and all three in `table1.md`);
5. a Fig. 2 style figure per modality (`figures/`) and one phantom series
   upscaled to a derived DICOM series (`upscaled/`).

It uses `configs/quickstart.yaml`: small networks (a few RRDB blocks),
small patches, a few hundred steps, random VGG19 weights (no download). It
shows that every part works end to end; its numbers say nothing about the
paper's full-size results.
"""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from tfgan_ct.config import Config
from tfgan_ct.errors import TfganError
from tfgan_ct.stages import CT_MODALITIES

log = logging.getLogger(__name__)



class QuickstartError(TfganError, RuntimeError):
    """An output folder in the way, or a step that failed."""


@dataclass
class QuickstartResult:
    """Where the quickstart left each result, and the Table 1 it measured."""

    out: Path
    paths: dict[str, Path] = field(default_factory=dict)
    tables: dict[str, dict] = field(default_factory=dict)
    seconds: float = 0.0


class _Steps:
    """Numbered log lines: '[3/9] training ncct'."""

    def __init__(self, total: int):
        self.total, self.done, self.start = total, 0, time.perf_counter()

    def next(self, text: str) -> None:
        self.done += 1
        log.info("[%d/%d] %s (%.0f s so far)", self.done, self.total, text, time.perf_counter() - self.start)


def run(out: str | Path, cfg: Config, patients: int = 6, size: int = 128, overwrite: bool = False,
        progress: bool = True) -> QuickstartResult:
    """Run every step; returns the paths of the results and the measured tables."""
    from tfgan_ct.data import convert, images
    from tfgan_ct.demo import phantom
    from tfgan_ct.demo.sample_images import write_sample_images
    from tfgan_ct.deploy import inference, upscale
    from tfgan_ct.evaluation import evaluate
    from tfgan_ct.evaluation.compare import compare, save_png
    from tfgan_ct.fileio import atomic_write_text
    from tfgan_ct.logs import log_to_file
    from tfgan_ct.training.train import train_stage

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise QuickstartError(f"{out} is not empty (use --overwrite to start again there)")
        if not (out / "quickstart.log").is_file():  # never empty a folder that is not ours
            raise QuickstartError(f"{out} is not empty and holds no earlier quickstart (no quickstart.log); "
                                  f"--overwrite only replaces a quickstart folder: choose a new or empty --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    result = QuickstartResult(out)
    steps = _Steps(8 + 2 * len(CT_MODALITIES))
    with log_to_file(out / "quickstart.log"):
        cfg.save(out / "config.yaml")
        steps.next(f"making a synthetic head study of {patients} patients ({size}x{size} slices)")
        phantom.make_dataset(out / "phantom", n_patients=patients, seed=cfg.convert.seed, size=size,
                             workers=2)
        steps.next("writing scikit-image's bundled sample photographs")
        photos = write_sample_images(out / "natural-images")
        if not photos:
            raise QuickstartError("no sample images are bundled with the installed scikit-image")

        steps.next("converting the phantom DICOM to shards")
        convert.convert([out / "phantom"], out / "data/ct", cfg, progress=progress)
        steps.next(f"converting {len(photos)} photographs to shards")
        images.convert_images([out / "natural-images"], out / "data/natural", cfg, progress=progress)

        common = {"runs_dir": out / "runs"}
        steps.next("training the natural-image stage")
        train_stage("natural", out / "data/natural", cfg, models_dir=out / "saved_models", **common)
        for stage in CT_MODALITIES:
            steps.next(f"training {stage} (warm start from the stage before)")
            train_stage(stage, out / "data/ct", cfg, models_dir=out / "saved_models", **common)
            steps.next(f"training the {stage} Scratch baseline (no warm start)")
            train_stage(stage, out / "data/ct", cfg, warm_start="none", models_dir=out / "scratch_models",
                        **common)

        steps.next("evaluating each stage against bicubic and its Scratch baseline")
        sections = []
        for stage in CT_MODALITIES:
            methods = [inference.bicubic(), inference.load(f"Scratch={out / 'scratch_models' / stage}"),
                       inference.load(f"TL={out / 'saved_models' / stage}")]
            slices = evaluate.load_slices(out / "data/ct", stage, cfg)
            scores = evaluate.evaluate(methods, slices, stage, progress=progress)
            table = evaluate.summarize(scores, "Scratch")
            evaluate.write_outputs(scores, table, out / "evaluation" / stage)
            evaluate.update_model_cards(methods, table, out / "data/ct")  # the exports' MODEL_CARD.md
            result.tables[stage] = table
            sections.append(evaluate.markdown(table))
            (out / "figures").mkdir(exist_ok=True)
            save_png(compare(slices, methods, count=1, panel=256), out / "figures" / f"{stage}.png")
        atomic_write_text(out / "table1.md", "\n".join(sections))
        result.paths.update({"table": out / "table1.md", "evaluation": out / "evaluation",
                             "figures": out / "figures", "models": out / "saved_models",
                             "scratch models": out / "scratch_models", "runs (TensorBoard)": out / "runs"})

        steps.next("upscaling a phantom NCCT series to a derived DICOM series")
        series = sorted((out / "phantom").glob("*/01_ncct"))[-1]
        upscale.upscale([series], out / "upscaled", inference.load(str(out / "saved_models" / "ncct")), cfg,
                        progress=progress)
        result.paths["upscaled DICOM"] = out / "upscaled"
        result.seconds = time.perf_counter() - steps.start
        log.info("quickstart finished in %.0f s", result.seconds)
    return result


def summary_lines(result: QuickstartResult) -> list[str]:
    """What a user reads at the end: each stage's PSNR against bicubic, and where things are."""
    lines = [f"quickstart finished in {result.seconds / 60:.1f} min; results in {result.out}", ""]
    for stage, table in result.tables.items():
        m = table["methods"]
        lines.append(f"  {stage.upper():5s} PSNR in the brain: bicubic {m['bicubic']['psnr']['mean']:.2f} dB, "
                     f"Scratch {m['Scratch']['psnr']['mean']:.2f} dB, TL {m['TL']['psnr']['mean']:.2f} dB")
    lines.append("")
    for name, path in result.paths.items():
        lines.append(f"  {name:20s} {path}")
    return lines
