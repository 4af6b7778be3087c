"""Which model upscales a PACS series: one per CT modality, as `convert --modality auto` decides.

Three ways to name them: the newest export of each stage under a models folder
(the default), one export for every series (`--model SPEC`), or TensorFlow
Serving (`--server URL`, model names = stage names). Models are loaded once,
the first time a series of their modality comes.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from tfgan_ct.deploy import inference
from tfgan_ct.deploy.pacs.dicomweb import PacsError

log = logging.getLogger(__name__)


@dataclass
class Models:
    """Methods per modality. `spec` (one model for all) and `server` are as in `tfgan-ct upscale`."""

    models_dir: Path = Path("saved_models")
    spec: str | None = None
    server: str | None = None
    _loaded: dict[str, inference.Method] = field(default_factory=dict)

    def for_modality(self, modality: str) -> inference.Method:
        """The method for series of `modality` (ncct, ctp or cta); PacsError when there is none."""
        key = self.spec or modality
        if key not in self._loaded:
            try:
                method = inference.load(key, self.models_dir, self.server)
            except inference.InferenceError as exc:
                raise PacsError(f"no model for {modality} series: {exc}") from None
            log.info("model for %s series: %s%s", modality, method.description,
                     f" (card {method.metadata['card_sha256']})" if method.metadata.get("card_sha256") else "")
            self._loaded[key] = method
        method = self._loaded[key]
        stage = method.metadata.get("stage")
        if self.spec and stage and stage != modality:
            log.warning("a %s series is upscaled with the %s model given by --model", modality, stage)
        return method

    @staticmethod
    def uid_seed(method: inference.Method) -> str:
        """What the derived UIDs are seeded with: the model's identity, so one model writing one
        series twice gives the same UIDs (a PACS keeps one copy) and another model new ones."""
        meta = method.metadata
        return "|".join(str(part) for part in (method.description, meta.get("card_sha256", ""),
                                                meta.get("server", ""), method.scale))
