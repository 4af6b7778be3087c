"""Paths shared by the tests: `from helpers import REPO, SHARED, SMALL_CONFIG`."""
from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The real sample files (CT slices, compressed and legacy encodings, broken files, Set5):
# `../shared/data` beside the checkout, or the folder TFGAN_CT_SAMPLES names. Tests that
# need them skip without them; TFGAN_CT_SAMPLES=/nonexistent shows what runs without.
SHARED = Path(os.environ.get("TFGAN_CT_SAMPLES") or REPO.parent / "shared" / "data")
# The small configuration shipped with the package (tiny patches and batches).
SMALL_CONFIG = REPO / "tfgan_ct" / "configs" / "small.yaml"
