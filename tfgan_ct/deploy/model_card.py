"""MODEL_CARD.md: what an export is for, what it learnt from, and where it stops.

Every export folder (`saved_models/<stage>/<version>/`) holds one, written from
the export's metadata (`tfgan_ct.json`, see `tfgan_ct.deploy.layout`) and the
files of the SavedModel beside it. It names no patient, series or file path:
the training data appear only as the dataset manifest's SHA-256 and its counts.
`card_hash` is the short name a derived DICOM gives the card it was made under.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from tfgan_ct import fileio
from tfgan_ct.version import __version__

MODEL_CARD = "MODEL_CARD.md"
NOT_RECORDED = "not recorded"

MODALITY_NAMES = {"ncct": "non-contrast CT (NCCT)", "ctp": "CT perfusion (CTP)", "cta": "CT angiography (CTA)"}

LIMITS = (
    "Runs on the synthetic phantom (`tfgan-ct quickstart`, tests) say nothing about patient data: "
    "they only show that the pipeline works.",
    "The model only knows its HU window: values outside it come out clipped to the window's edges, "
    "so the derived image holds no information outside the window.",
    "Super-resolution adds plausible detail; it cannot recover what the source did not measure. Check "
    "the derived image against its source (the LR consistency figures of a derived series).",
    "Tiled inference (`--tile`) differs slightly near the tile seams unless `--tile-pad` covers the "
    "network's receptive field.",
    "Trained and checked on brain CT of one modality only; other body parts, modalities or "
    "reconstruction kernels are outside its training data.",
)


def _value(metadata: dict, key: str) -> str:
    """`metadata[key]` as text, or 'not recorded'."""
    value = metadata.get(key)
    return NOT_RECORDED if value is None or value == "" else str(value)


def _weights_lines(export_dir: Path) -> list[str]:
    """One Markdown table row per SavedModel file (graph and variables): size and SHA-256 (16 hex digits)."""
    files = [export_dir / "saved_model.pb", *sorted((export_dir / "variables").glob("*"))]
    rows = [f"| `{p.relative_to(export_dir).as_posix()}` | {p.stat().st_size:,} | `{fileio.file_sha256(p)[:16]}` |"
            for p in files if p.is_file()]
    if not rows:
        return ["No SavedModel files found beside this card."]
    return ["| File | Bytes | SHA-256 (first 16) |", "|---|---:|---|", *rows]


def _counts_lines(counts) -> list[str]:
    """The dataset manifest's `counts` ({split: {patients, series, slices, records, by_modality}}) as a table."""
    if not isinstance(counts, dict) or not counts:
        return [f"Counts by modality and split: {NOT_RECORDED} in this export's metadata "
                f"(`data_counts`); see the dataset's manifest.json with the hash above."]
    lines = ["| Split | Patients | Series | Slices | Records | By modality (slices) |", "|---|---:|---:|---:|---:|---|"]
    for split, entry in counts.items():
        entry = entry if isinstance(entry, dict) else {}
        modalities = entry.get("by_modality") or {}
        by = ", ".join(f"{m}: {v.get('slices', '?') if isinstance(v, dict) else v}" for m, v in modalities.items())
        lines.append(f"| {split} | {entry.get('patients', '?')} | {entry.get('series', '?')} | "
                     f"{entry.get('slices', '?')} | {entry.get('records', '?')} | {by or '-'} |")
    return lines


def _window_text(metadata: dict) -> str:
    window = metadata.get("window")
    if not isinstance(window, dict) or "center" not in window or "width" not in window:
        return NOT_RECORDED
    center, width = float(window["center"]), float(window["width"])
    return f"center {center:g} HU, width {width:g} HU ({center - width / 2:g} to {center + width / 2:g} HU)"


def _parent_text(metadata: dict) -> str:
    parent = metadata.get("parent")
    if not parent:
        return "none (trained from scratch)"
    version = metadata.get("parent_version")
    return f"{parent} v{version}" if version is not None else str(parent)


def _network_text(metadata: dict) -> str:
    config = metadata.get("config")
    model = config.get("model") if isinstance(config, dict) else None
    if isinstance(model, dict) and "num_blocks" in model:
        return (f"ESRGAN RRDBNet generator, {model.get('num_blocks')} RRDB blocks, {model.get('features')} "
                f"features, growth {model.get('growth')}")
    paths = metadata.get("variable_paths")
    count = len(paths.get("generator", [])) if isinstance(paths, dict) else None
    return f"ESRGAN RRDBNet generator ({count} variables)" if count else "ESRGAN RRDBNet generator"


def _chosen_text(metadata: dict) -> str:
    """Which weights were exported (`exported_weights`: ema, best, last) and their validation figure."""
    kind = metadata.get("exported_weights")
    if not kind:
        return f"{NOT_RECORDED} (exports before tfgan-ct recorded it hold the last step's)"
    names = {"ema": f"moving average of the generator (decay {metadata.get('ema_decay')})",
             "best": "best", "last": "last step"}
    figures = metadata.get("exported_validation") or {}
    psnr = figures.get("psnr_mask")
    text = f"{names.get(kind, kind)} (validation PSNR {psnr:.2f} dB in the brain mask, " if psnr is not None \
        else f"{names.get(kind, kind)} (no validation, "
    text += f"step {metadata.get('exported_step')})"
    stopped = metadata.get("stopped_by_collapse_at")
    return text + (f"; training stopped at step {stopped} on a collapse" if stopped else "")


def render(export_dir: str | Path, metadata: dict, evaluation_markdown: str | None = None) -> str:
    """The card's Markdown for the export at `export_dir` with metadata `metadata`."""
    export_dir = Path(export_dir)
    stage = _value(metadata, "stage")
    modality = MODALITY_NAMES.get(metadata.get("modality") or stage, stage)
    scale = _value(metadata, "scale")
    sha = metadata.get("data_manifest_sha256")
    if stage == "natural":
        use = (f"x{scale} super-resolution of natural images: the pre-training stage that the CT stages "
               "warm-start from, not a model for CT images. Not for diagnosis on its own.")
    else:
        use = (f"x{scale} super-resolution of brain CT slices of {modality}, for research. "
               "Not for diagnosis on its own: a derived image is read together with its source series.")
    lines = [
        f"# Model card: tfgan-ct `{stage}` v{_value(metadata, 'version')}",
        "",
        "## Intended use",
        "",
        use,
        "",
        "## Model",
        "",
        f"- Stage: {stage}; version: {_value(metadata, 'version')}; modality: {_value(metadata, 'modality')}",
        f"- Parent stage (warm start): {_parent_text(metadata)}",
        f"- Training steps: {_value(metadata, 'steps')}",
        f"- Weights: {_chosen_text(metadata)}",
        f"- Window: {_window_text(metadata)}",
        f"- Scale: x{scale}",
        f"- Network: {_network_text(metadata)}",
        f"- Card written by tfgan-ct {__version__}",
        "",
        "## Training data",
        "",
        f"- Dataset manifest SHA-256: {f'`{sha}`' if sha else NOT_RECORDED}",
        "",
        *_counts_lines(metadata.get("data_counts")),
        "",
        "## Exported weights",
        "",
        *_weights_lines(export_dir),
        "",
        "## Evaluation",
        "",
        evaluation_markdown.strip() if evaluation_markdown else
        "Not evaluated yet: run `tfgan-ct evaluate` on this export and write the card again with its table.",
        "",
        "## Known limits",
        "",
        *(f"- {limit}" for limit in LIMITS),
        "",
    ]
    return "\n".join(lines)


def write_model_card(export_dir: str | Path, metadata: dict, evaluation_markdown: str | None = None) -> Path:
    """Write (atomically) MODEL_CARD.md into the export folder `export_dir`; returns its path.

    `metadata`: the export's metadata (as `layout.read_metadata` returns it);
    `evaluation_markdown`: a Markdown table of `tfgan-ct evaluate`, or None.
    """
    path = Path(export_dir) / MODEL_CARD
    fileio.atomic_write_text(path, render(export_dir, metadata, evaluation_markdown))
    return path


def card_hash(export_dir: str | Path) -> str:
    """SHA-256 of the export's MODEL_CARD.md, first 16 hex digits; FileNotFoundError when it has none."""
    return hashlib.sha256((Path(export_dir) / MODEL_CARD).read_bytes()).hexdigest()[:16]
