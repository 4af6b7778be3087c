"""Scoring SR methods on the test slices of a converted dataset (the paper's Table 1).

For every test slice and method: PSNR and SSIM of the SR image against the
HR slice, both as [0, 1] windowed images (NHWC slices from
`tfgan_ct.data.pipeline.eval_dataset`), computed

- inside the brain mask (the paper's figure, `psnr` / `ssim` columns), and
- over the whole slice (`psnr_full` / `ssim_full`), as a second figure.

The table gives, per method, the mean and variance of each metric over the
slices and a one-tailed paired t-test (SciPy ``ttest_rel``, alternative
"greater") of the method against a baseline: p < alpha means the method's
mean is significantly higher than the baseline's on the same slices.
"""
from __future__ import annotations

import csv
import datetime
import io
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import stats
from tqdm import tqdm

from tfgan_ct.config import Config, Window
from tfgan_ct.deploy import inference
from tfgan_ct.deploy.layout import read_metadata
from tfgan_ct.deploy.model_card import write_model_card
from tfgan_ct.errors import TfganError
from tfgan_ct.evaluation import metrics
from tfgan_ct.fileio import atomic_write_text

log = logging.getLogger(__name__)

METRICS = ("psnr", "ssim", "psnr_full", "ssim_full")
CSV_COLUMNS = ("method", "patient", "series", "slice_index", *METRICS)


class EvaluationError(TfganError, RuntimeError):
    """Nothing to evaluate, or a method that cannot be scored."""


@dataclass
class Slice:
    """One test slice: lr [h, w], hr and mask [4h, 4w]; [0, 1] float32 / bool."""

    lr: np.ndarray
    hr: np.ndarray
    mask: np.ndarray
    patient: str
    series: str
    slice_index: int


@dataclass
class Results:
    """Per-slice scores of each method, in slice order."""

    modality: str
    split: str
    methods: list[str]
    rows: list[dict] = field(default_factory=list)

    def scores(self, method: str, metric: str) -> np.ndarray:
        """float64 [n_slices] of one metric for one method."""
        return np.array([r[metric] for r in self.rows if r["method"] == method], dtype=np.float64)


def only_modality(data_dir: str | Path, split: str = "test") -> str:
    """The only modality with `split` slices in the dataset; an error if none or several."""
    from tfgan_ct.data.pipeline import load_manifest

    manifest = load_manifest(data_dir)
    have = sorted({s["modality"] for s in manifest["shards"].get(split, [])})
    if len(have) != 1:
        raise EvaluationError(f"{data_dir}: {split} slices of " + (
            f"several modalities ({', '.join(have)}); choose one with --modality" if have
            else "no modality (the dataset has no such slices)"))
    return have[0]


def load_slices(data_dir: str | Path, modality: str, cfg: Config, split: str = "test",
                limit: int | None = None) -> list[Slice]:
    """The whole slices of `split` as [0, 1] images, in file order (at most `limit`)."""
    from tfgan_ct.data.pipeline import eval_dataset

    dataset = eval_dataset(data_dir, split, modality, cfg)
    if limit:
        dataset = dataset.take(limit)
    return [Slice(e["lr"][..., 0], e["hr"][..., 0], e["mask"][..., 0], e["patient"].decode(),
                  e["series"].decode(), int(e["slice_index"])) for e in dataset.as_numpy_iterator()]


def score(sr: np.ndarray, item: Slice) -> dict[str, float]:
    """PSNR (dB) and SSIM of one SR slice, inside the mask and over the whole slice."""
    return {"psnr": metrics.psnr(sr, item.hr, 1.0, mask=item.mask),
            "ssim": metrics.ssim(sr, item.hr, 1.0, mask=item.mask),
            "psnr_full": metrics.psnr(sr, item.hr, 1.0),
            "ssim_full": metrics.ssim(sr, item.hr, 1.0)}


def check_windows(methods: list[inference.Method], window: Window, modality: str) -> None:
    """Refuse models trained on a different HU window than the one the slices are scored in.

    A model sees [0, 1] = `window`; given slices windowed otherwise it gets
    inputs on another scale and its scores are meaningless.
    """
    for method in methods:
        trained = method.metadata.get("window")
        if method.metadata.get("stage") == "natural" and modality != "natural":
            continue  # a natural-image model applied to CT as it is (a baseline): no CT window to match
        if not trained and method.metadata.get("server"):
            log.warning("%s: the served model's HU window is not known here; scoring assumes it is the "
                        "config's %s window (center %g, width %g)", method.name, modality, window.center,
                        window.width)
        if trained and (trained["center"], trained["width"]) != (window.center, window.width):
            raise EvaluationError(
                f"{method.name} was trained on the HU window center {trained['center']:g} / width "
                f"{trained['width']:g}, but the {modality} slices are windowed with center {window.center:g} / "
                f"width {window.width:g}; evaluate with the model's window (--set "
                f"modalities.{modality}.window.center={trained['center']:g} --set "
                f"modalities.{modality}.window.width={trained['width']:g}) or use a model trained on this one")


def evaluate(methods: list[inference.Method], slices: list[Slice], modality: str, split: str = "test",
             tile: int = 0, tile_pad: int = 16, progress: bool = True) -> Results:
    """Run every method on every slice and score it."""
    if not slices:
        raise EvaluationError("no slices to evaluate")
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise EvaluationError(f"methods named twice: {', '.join(names)}")
    results = Results(modality, split, names)
    bar = tqdm(total=len(slices) * len(methods), desc="evaluating", unit="slice", disable=not progress)
    for method in methods:
        for item in slices:
            sr = np.clip(inference.upscale_image(method, item.lr, tile, tile_pad), 0.0, 1.0)
            if sr.shape != item.hr.shape:
                raise EvaluationError(f"{method.name}: output {sr.shape} for HR {item.hr.shape} "
                                      f"(scale {method.scale}?)")
            results.rows.append({"method": method.name, "patient": item.patient, "series": item.series,
                                 "slice_index": item.slice_index, **score(sr, item)})
            bar.update()
        log.info("%s: PSNR %.2f dB, SSIM %.4f (mean over %d %s slices, inside the mask)", method.name,
                 results.scores(method.name, "psnr").mean(), results.scores(method.name, "ssim").mean(),
                 len(slices), modality.upper())
    bar.close()
    return results


def summarize(results: Results, baseline: str, alpha: float = 0.05) -> dict:
    """Table 1 as a dict: per method, mean/variance of each metric and the t-test vs `baseline`."""
    if baseline not in results.methods:
        raise EvaluationError(f"baseline {baseline!r} is not among the methods "
                              f"({', '.join(results.methods)})")
    table = {"modality": results.modality, "split": results.split, "baseline": baseline, "alpha": alpha,
             "slices": len(results.scores(baseline, "psnr")), "methods": {}}
    for method in results.methods:
        entry = {}
        for metric in METRICS:
            values = results.scores(method, metric)
            entry[metric] = {"mean": float(values.mean()),
                             "variance": float(values.var(ddof=1)) if len(values) > 1 else 0.0}
            if method != baseline:
                p = paired_p_value(values, results.scores(baseline, metric))
                entry[metric]["p_value"] = p if math.isfinite(p) else None  # None: not testable
                entry[metric]["significant"] = bool(math.isfinite(p) and p < alpha)
        table["methods"][method] = entry
    table["best"] = {metric: max(results.methods, key=lambda m: table["methods"][m][metric]["mean"])
                     for metric in METRICS}
    return table


def paired_p_value(method: np.ndarray, baseline: np.ndarray) -> float:
    """One-tailed paired t-test p-value for 'method > baseline' (NaN with < 2 pairs or no spread)."""
    if len(method) < 2:
        return float("nan")
    diff = np.asarray(method) - np.asarray(baseline)
    if np.allclose(diff, diff[0]):
        return 0.0 if diff[0] > 0 else 1.0 if diff[0] < 0 else float("nan")
    return float(stats.ttest_rel(method, baseline, alternative="greater").pvalue)


def markdown(table: dict) -> str:
    """The table in the paper's layout: mean (variance) per metric, best in bold, p vs baseline."""
    lines = [f"{table['modality'].upper()}, {table['slices']} {table['split']} slices; "
             f"PSNR in dB, SSIM; mean (variance); p: one-tailed paired t-test against "
             f"{table['baseline']} (alpha {table['alpha']}).", "",
             "| Method | PSNR (mask) | p | SSIM (mask) | p | PSNR (slice) | SSIM (slice) |",
             "|---|---|---|---|---|---|---|"]
    for method, entry in table["methods"].items():
        cells = [method]
        for metric, digits in (("psnr", 2), ("ssim", 4)):
            cells.append(_cell(table, method, metric, digits))
            cells.append(_p_cell(entry[metric]))
        cells += [_cell(table, method, "psnr_full", 2), _cell(table, method, "ssim_full", 4)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(table: dict, method: str, metric: str, digits: int) -> str:
    value = table["methods"][method][metric]
    text = f"{value['mean']:.{digits}f} ({value['variance']:.{digits}g})"
    return f"**{text}**" if table["best"][metric] == method else text


def _p_cell(value: dict) -> str:
    if "p_value" not in value:
        return "baseline"
    p = value["p_value"]
    if p is None:
        return "n/a"
    return f"{p:.2g}" + (" *" if value["significant"] else "")


def per_slice_csv(results: Results) -> str:
    """The per-slice scores as CSV text (pseudonymous patient and series hashes only)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in results.rows:
        writer.writerow({k: (f"{row[k]:.6f}" if k in METRICS else row[k]) for k in CSV_COLUMNS})
    return buffer.getvalue()


def write_outputs(results: Results, table: dict, out: str | Path) -> dict[str, Path]:
    """per_slice.csv, table.md and table.json in `out`, each written atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "per_slice.csv", "markdown": out / "table.md", "json": out / "table.json"}
    atomic_write_text(paths["csv"], per_slice_csv(results))
    atomic_write_text(paths["markdown"], markdown(table))
    atomic_write_text(paths["json"], json.dumps(table, indent=2) + "\n")
    return paths


def update_model_cards(methods: list[inference.Method], table: dict, data_dir: str | Path) -> list[Path]:
    """Write this evaluation into the MODEL_CARD.md of every evaluated export (methods loaded from
    an export folder); returns the cards written. The card's hash changes with it: derived images
    made before name the card as it was then."""
    from tfgan_ct.data.pipeline import DataError, load_manifest, manifest_sha256

    try:
        digest = manifest_sha256(load_manifest(data_dir))
    except DataError:
        digest = None
    section = (f"Scored with `tfgan-ct evaluate` on {_today()} (dataset manifest SHA-256 "
               f"{f'`{digest}`' if digest else 'not recorded'}):\n\n{markdown(table)}")
    written = []
    for method in methods:
        if method.path is None or not method.metadata.get("stage"):
            continue
        written.append(write_model_card(method.path, read_metadata(method.path), section))
        log.info("model card of %s updated with this evaluation: %s", method.description, written[-1])
    return written


def _today() -> str:
    return datetime.date.today().isoformat()
