"""MODEL_CARD.md in every export: contents, no identifiers, a stable hash."""
from __future__ import annotations

import re
import shutil

import pytest

from tfgan_ct.config import Window
from tfgan_ct.deploy import export, model_card
from tfgan_ct.model.discriminator import build_discriminator
from tfgan_ct.model.generator import build_generator

MANIFEST_SHA = "ab" * 32
COUNTS = {"train": {"records": 40, "slices": 12, "patients": 2, "series": 6,
                    "by_modality": {"ncct": {"records": 20, "slices": 8}, "cta": {"records": 20, "slices": 4}}},
          "val": {"records": 4, "slices": 2, "patients": 1, "series": 3,
                  "by_modality": {"ncct": {"records": 4, "slices": 2}}}}


@pytest.fixture(scope="module")
def trained_like(tmp_path_factory):
    """A tiny `ctp` export with the metadata `train` gives it (parent ncct v3, steps, manifest hash, counts)."""
    models = tmp_path_factory.mktemp("card-models")
    meta = {"parent": "ncct", "parent_version": 3, "parent_path": "/home/jdoe/Smith_John/saved_models/ncct/3",
            "steps": 1200, "modality": "ctp", "data_manifest_sha256": MANIFEST_SHA, "data_counts": COUNTS,
            "config": {"model": {"num_blocks": 1, "features": 8, "growth": 4}}}
    return export.export_stage(build_generator(1, 8, 4), build_discriminator(32, features=8),
                               models, "ctp", Window(40.0, 80.0), 4, meta)


def test_every_export_has_its_card(tiny_export):
    card = (tiny_export / "ncct/1" / model_card.MODEL_CARD).read_text()
    assert "tfgan-ct `ncct` v1" in card
    assert "Not for diagnosis on its own" in card
    assert "Parent stage (warm start): none (trained from scratch)" in card
    assert "center 40 HU, width 80 HU" in card and "Scale: x4" in card
    assert "`variables/variables.data-00000-of-00001`" in card and "`saved_model.pb`" in card
    assert "Not evaluated yet" in card


def test_card_names_parent_steps_data_and_window(trained_like):
    card = (trained_like / model_card.MODEL_CARD).read_text()
    assert "# Model card: tfgan-ct `ctp` v1" in card
    assert "CT perfusion (CTP)" in card and "x4 super-resolution of brain CT" in card
    assert "Parent stage (warm start): ncct v3" in card
    assert "Training steps: 1200" in card
    assert "Window: center 40 HU, width 80 HU (0 to 80 HU)" in card
    assert MANIFEST_SHA in card
    assert "| train | 2 | 6 | 12 | 40 | ncct: 8, cta: 4 |" in card
    assert "| val | 1 | 3 | 2 | 4 | ncct: 2 |" in card
    assert "1 RRDB blocks, 8 features" in card
    assert "Not for diagnosis on its own" in card
    assert "only knows its HU window" in card and "phantom" in card and "seams" in card


def test_card_has_no_paths_or_identifiers(trained_like):
    card = (trained_like / model_card.MODEL_CARD).read_text()
    assert "Smith" not in card and "jdoe" not in card and "/home" not in card
    assert str(trained_like) not in card and ".partial" not in card
    assert not re.search(r"\b\d+(\.\d+){4,}\b", card)          # no DICOM UIDs


def test_card_hash_is_stable(trained_like, tmp_path):
    first = model_card.card_hash(trained_like)
    assert re.fullmatch(r"[0-9a-f]{16}", first)
    copy = tmp_path / "copy"
    shutil.copytree(trained_like, copy)
    model_card.write_model_card(copy, export.read_metadata(copy))          # rewritten from the same export
    assert model_card.card_hash(copy) == first
    model_card.write_model_card(copy, export.read_metadata(copy), "| metric | SR |\n|---|---|\n| PSNR | 30.1 |\n")
    card = (copy / model_card.MODEL_CARD).read_text()
    assert "| PSNR | 30.1 |" in card and "Not evaluated yet" not in card
    assert model_card.card_hash(copy) != first
    assert not [p.name for p in copy.iterdir() if p.name.startswith(".")]      # atomic write left nothing


def test_missing_counts_are_said_so():
    text = model_card.render("/nonexistent", {"stage": "cta", "version": 2})
    assert "not recorded" in text and "No SavedModel files found" in text
    assert "manifest SHA-256: not recorded" in text
    natural = model_card.render("/nonexistent", {"stage": "natural", "version": 1})
    assert "pre-training stage" in natural and "Not for diagnosis on its own" in natural
    with pytest.raises(FileNotFoundError):
        model_card.card_hash("/nonexistent")
