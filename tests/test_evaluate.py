"""Scoring methods on test slices: per-slice metrics, Table 1, paired t-tests, the CLI."""
from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from scipy import stats

from tfgan_ct.cli import main
from tfgan_ct.config import load_config
from tfgan_ct.data import resize
from tfgan_ct.data.pipeline import load_manifest
from tfgan_ct.data.shards import read_records
from tfgan_ct.evaluation import evaluate, metrics

from helpers import SMALL_CONFIG


def fake_results(values: dict[str, list[float]]) -> evaluate.Results:
    results = evaluate.Results("ncct", "test", list(values))
    for method, scores in values.items():
        for i, v in enumerate(scores):
            results.rows.append({"method": method, "patient": "p", "series": "s", "slice_index": i,
                                 "psnr": v, "ssim": v / 100, "psnr_full": v + 1, "ssim_full": v / 50})
    return results


def test_paired_t_test_is_one_tailed_and_paired():
    rng = np.random.default_rng(0)
    base = rng.normal(25, 2, 30)
    better = base + rng.normal(0.5, 0.3, 30)
    p = evaluate.paired_p_value(better, base)
    assert p == pytest.approx(stats.ttest_rel(better, base).pvalue / 2)  # one tail of a symmetric test
    assert p < 1e-6 and evaluate.paired_p_value(base, better) > 0.99
    # Paired: a constant shift is certain although the samples overlap widely.
    assert evaluate.paired_p_value(base + 0.1, base) == 0.0
    assert np.isnan(evaluate.paired_p_value(base[:1], base[:1]))


def test_table_bold_best_and_p_values():
    results = fake_results({"bicubic": [20, 21, 22, 20.5], "ncct": [22, 23, 23.5, 22.0],
                            "scratch": [19, 21.5, 21, 20]})
    table = evaluate.summarize(results, "bicubic")
    assert table["best"]["psnr"] == "ncct" and table["slices"] == 4
    ncct = table["methods"]["ncct"]["psnr"]
    assert ncct["mean"] == pytest.approx(22.625)
    assert ncct["variance"] == pytest.approx(np.var([22, 23, 23.5, 22.0], ddof=1))
    assert ncct["significant"] and not table["methods"]["scratch"]["psnr"]["significant"]
    text = evaluate.markdown(table)
    assert "| **22.62" in text and "| bicubic | 20.88" in text and "baseline" in text
    json.dumps(table)  # JSON-safe
    with pytest.raises(evaluate.EvaluationError, match="baseline 'x'"):
        evaluate.summarize(results, "x")


def test_evaluate_cli_scores_match_an_independent_computation(converted, tiny_export, tmp_path):
    data, _ = converted
    out = tmp_path / "eval"
    models = tmp_path / "models"
    shutil.copytree(tiny_export, models)  # its model card is rewritten with the table
    result = CliRunner().invoke(main, ["evaluate", "ncct", "--data", str(data), "--modality", "ncct",
                                       "--models-dir", str(models), "--out", str(out),
                                       "--config", str(SMALL_CONFIG), "--no-progress"])
    assert result.exit_code == 0, result.output
    card = (models / "ncct/1/MODEL_CARD.md").read_text()
    evaluation = card.split("## Evaluation")[1].split("## Known limits")[0]
    assert "Not evaluated yet" not in card and "| ncct |" in evaluation and "| bicubic |" in evaluation
    assert "dataset manifest SHA-256 `" in evaluation and str(data) not in card
    assert "| Method | PSNR (mask)" in result.output
    rows = list(csv.DictReader((out / "per_slice.csv").open()))
    table = json.loads((out / "table.json").read_text())
    n = table["slices"]
    assert len(rows) == 2 * n and {r["method"] for r in rows} == {"bicubic", "ncct"}
    assert (out / "table.md").read_text().startswith("NCCT, ")
    assert (out / "config.yaml").is_file() and "ncct: PSNR" in (out / "evaluate.log").read_text()

    # The bicubic row of the first test slice, recomputed from the shard with numpy alone.
    manifest = load_manifest(data)
    shard = next(s["file"] for s in manifest["shards"]["test"] if s["modality"] == "ncct")
    record = read_records(data / shard)[0]
    window = load_config(SMALL_CONFIG).modalities.ncct.window
    unit = lambda hu: np.clip((hu - window.floor) / window.width, 0, 1)  # noqa: E731
    sr = np.clip(resize.upscale(unit(record["lr"].astype(np.float64)), 4), 0, 1)
    first = rows[0]
    assert first["patient"] == record["patient"] and int(first["slice_index"]) == record["slice_index"]
    hr = unit(record["hr"].astype(np.float64))
    assert float(first["psnr"]) == pytest.approx(metrics.psnr(sr, hr, mask=record["mask"]), abs=1e-3)
    assert float(first["ssim_full"]) == pytest.approx(metrics.ssim(sr, hr), abs=1e-4)
    mean = np.mean([float(r["psnr"]) for r in rows if r["method"] == "bicubic"])
    assert table["methods"]["bicubic"]["psnr"]["mean"] == pytest.approx(mean, abs=1e-5)


def test_evaluate_cli_errors(converted, tiny_export, tmp_path):
    data, _ = converted
    runner = CliRunner()
    absent = runner.invoke(main, ["evaluate", "bicubic", "--data", str(data), "--modality", "natural",
                                  "--out", str(tmp_path)])
    assert absent.exit_code != 0 and "no test shards of modality 'natural'" in absent.output
    missing = runner.invoke(main, ["evaluate", "cta", "--data", str(data), "--modality", "ncct",
                                   "--models-dir", str(tiny_export), "--out", str(tmp_path)])
    assert missing.exit_code != 0 and "tfgan-ct train --stage cta" in missing.output
    assert "Traceback" not in missing.output
    negative = runner.invoke(main, ["evaluate", "bicubic", "--data", str(data), "--tile-pad", "-1",
                                    "--out", str(tmp_path)])
    assert negative.exit_code == 2 and "--tile-pad" in negative.output
    figure = tmp_path / "new" / "folder" / "figure.png"  # compare makes the folder
    made = runner.invoke(main, ["compare", "ncct", "--data", str(data), "--modality", "ncct", "--models-dir",
                                str(tiny_export), "--out", str(figure)])
    assert made.exit_code == 0 and figure.is_file(), made.output
    # The tiny export was trained on the NCCT window 40/80: another window is refused.
    for command in (["evaluate", "ncct", "--out", str(tmp_path)],
                    ["compare", "ncct", "--out", str(tmp_path / "f.png")]):
        other = runner.invoke(main, [*command, "--data", str(data), "--modality", "ncct", "--models-dir",
                                     str(tiny_export), "--set", "modalities.ncct.window.width=100"])
        assert other.exit_code != 0 and "trained on the HU window center 40 / width 80" in other.output, other.output
        assert "modalities.ncct.window.width=80" in other.output and "Traceback" not in other.output


def test_only_modality_asks_to_choose(tmp_path):
    shard = lambda m: {"file": f"test-{m}-00000.tfrecord", "modality": m}  # noqa: E731
    manifest = {"format": "tfgan-ct-shards", "shards": {"test": [shard("ctp"), shard("ncct")], "validation": []}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(evaluate.EvaluationError, match="several modalities .ctp, ncct.; choose one"):
        evaluate.only_modality(tmp_path)
    with pytest.raises(evaluate.EvaluationError, match="no modality"):
        evaluate.only_modality(tmp_path, "validation")
    manifest["shards"]["test"] = [shard("cta")]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert evaluate.only_modality(tmp_path) == "cta"


def test_natural_model_on_ct_is_not_refused_for_its_window():
    """A natural-image model applied to CT as it is (a baseline) has no CT window to match."""
    from tfgan_ct.config import Window
    from tfgan_ct.deploy.inference import Method
    from tfgan_ct.evaluation.evaluate import EvaluationError, check_windows

    natural = Method("natural", None, 4, {"stage": "natural", "window": {"center": 500.0, "width": 1000.0}})
    check_windows([natural], Window(40, 80), "ncct")
    ncct = Method("ncct", None, 4, {"stage": "ncct", "window": {"center": 40.0, "width": 80.0}})
    with pytest.raises(EvaluationError, match="trained on the HU window"):
        check_windows([ncct], Window(40, 100), "ncct")
