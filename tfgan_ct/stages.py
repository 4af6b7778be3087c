"""The vocabulary of the chain: stages, their parents, and the CT modalities.

A stage trains on the modality of the same name: `natural` on natural images
(DIV2K), the others on CT of that modality. Each stage warm-starts from its
parent's export.
"""
from __future__ import annotations

# CT modalities, in the order of the chain: non-contrast CT, CT perfusion, CT angiography.
CT_MODALITIES = ("ncct", "ctp", "cta")
NATURAL = "natural"
# The chain, in training order.
STAGES = (NATURAL, *CT_MODALITIES)
# The stage each stage warm-starts from by default (None: from scratch).
PARENT = {"natural": None, "ncct": "natural", "ctp": "ncct", "cta": "ctp"}
