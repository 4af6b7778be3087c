"""Running a super-resolution method on [0, 1] images, whole or in tiles.

A *method* turns LR images float32 [b, h, w, 1] in [0, 1] into SR images
float32 [b, 4h, 4w, 1] in [0, 1] (NHWC), so evaluation, figures and
`tfgan-ct upscale` treat them alike: an exported stage loaded with plain
``tf.saved_model.load`` (its ``serving_default`` signature), the same export
behind a TensorFlow Serving REST endpoint (``--server URL``), or ``bicubic``
(`tfgan_ct.data.resize`).

Tiled inference (`upscale_image` with ``tile > 0``) bounds memory for any
image size, as Real-ESRGAN's ``--tile``/``--tile_pad``; ``tile=None``
(`tfgan-ct upscale --tile auto`, the default) runs an image whole when its
estimated memory fits in half of the memory available now, and otherwise in
the largest tile that does (`auto_tile`): tiles cost time (+24 % for a 512
slice in 256 tiles, `docs/benchmarks.md`), so they are used only when needed. each ``tile`` x
``tile`` LR piece runs with ``pad`` LR pixels of context (clipped at the
border) and only its own part of the output is kept. Tiles equal the whole
image where ``pad`` covers the receptive field (about 350 LR pixels for the
paper network), and differ slightly near the seams otherwise.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tfgan_ct.data import resize
from tfgan_ct.deploy.layout import METADATA, ExportError, read_metadata, resolve
from tfgan_ct.deploy.model_card import MODEL_CARD, card_hash
from tfgan_ct.errors import TfganError

log = logging.getLogger(__name__)

BICUBIC = "bicubic"


class InferenceError(TfganError, RuntimeError):
    """A method that cannot be loaded or run."""


@dataclass
class Method:
    """A named SR method. `predict` maps float32 [b, h, w, 1] in [0, 1] to [b, 4h, 4w, 1]."""

    name: str
    predict: object                      # callable(np.ndarray) -> np.ndarray
    scale: int = 4
    metadata: dict = field(default_factory=dict)
    path: Path | None = None             # the export folder, for a method loaded from one

    @property
    def description(self) -> str:
        """'ncct v3', 'bicubic', or the name, for logs and DICOM descriptions."""
        stage, version = self.metadata.get("stage"), self.metadata.get("version")
        return f"{stage} v{version}" if stage and version else self.name


def bicubic(scale: int = 4) -> Method:
    """The MATLAB-compatible bicubic baseline."""

    def predict(lr: np.ndarray) -> np.ndarray:
        lr = _check_batch(lr)
        return np.stack([resize.upscale(x[..., 0], scale)[..., None] for x in lr]).astype(np.float32)

    return Method(BICUBIC, predict, scale, {"method": BICUBIC})


def saved_model(path: str | Path, name: str | None = None) -> Method:
    """An exported stage at `path` (a version folder), called with plain TensorFlow.

    Raises InferenceError, naming the export and the problem, when it cannot be
    loaded: damaged metadata or variables (e.g. a truncated file), no
    serving_default signature, or a scale that is not a positive integer.
    """
    import tensorflow as tf

    from tfgan_ct.deploy.export import load_saved_model

    path = Path(path)
    try:
        metadata = read_metadata(path)
        loaded = load_saved_model(path)
    except ExportError as exc:
        raise InferenceError(str(exc)) from None
    try:
        signature = loaded.signatures["serving_default"]
    except KeyError:
        raise InferenceError(f"{path}: cannot load a SavedModel with a serving_default signature "
                             f"(it has {', '.join(loaded.signatures) or 'no signatures'})") from None
    scale = metadata.get("scale", 4)
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise InferenceError(f"{path}: damaged export, 'scale' in its {METADATA} is {scale!r}, "
                             f"not a positive integer")

    def predict(lr: np.ndarray) -> np.ndarray:
        return signature(lr=tf.constant(_check_batch(lr)))["sr"].numpy()

    predict.loaded = loaded  # keep the SavedModel object alive with the function
    if (path / MODEL_CARD).is_file():
        metadata = {**metadata, "card_sha256": card_hash(path)}  # derived images name the card
    return Method(name or _default_name(path, metadata), predict, scale, metadata, path)


def remote(url: str, model: str, version: int | None = None, name: str | None = None,
           scale: int = 4) -> Method:
    """A model served by TensorFlow Serving at `url`: gRPC (grpc://host:8500, grpcs:// with TLS;
    tensors as raw bytes) or REST (http://host:8501; tensors as JSON text)."""
    from tfgan_ct.deploy.serving import client, grpc_client
    from tfgan_ct.deploy.serving.errors import ServingError

    transport = grpc_client if grpc_client.is_grpc(url) else client

    def predict(lr: np.ndarray) -> np.ndarray:
        try:
            return transport.predict(url, model, _check_batch(lr), version=version)
        except ServingError as exc:
            raise InferenceError(str(exc)) from None

    return Method(name or f"{model}@{url}", predict, scale,
                  {"stage": model, "server": url, **({"version": version} if version else {})})


def load(spec: str, models_dir: str | Path = "saved_models", server: str | None = None) -> Method:
    """A method from its spec: 'bicubic', 'stage', 'stage@N' or a SavedModel path,
    optionally named 'NAME=SPEC' (e.g. 'Scratch=scratch_models/ncct') for tables and figures.

    With `server`, stage names are sent to that TensorFlow Serving endpoint
    instead of being loaded here ('stage@N' asks for version N).
    """
    name, _, spec = spec.rpartition("=") if "=" in spec else (None, "", spec)
    if spec == BICUBIC:
        method = bicubic()
        method.name = name or BICUBIC
        return method
    if server:
        stage, _, version = spec.partition("@")
        if not stage or (version and not version.isdigit()):
            raise InferenceError(f"{spec!r}: with --server, a model is STAGE or STAGE@N (N a version number)")
        return remote(server, stage, int(version) if version else None, name=name or spec)
    try:
        path = resolve(spec, models_dir)
    except ExportError as exc:
        raise InferenceError(str(exc)) from None
    return saved_model(path, name=name or spec)


def _default_name(path: Path, metadata: dict) -> str:
    if metadata.get("stage") and metadata.get("version"):
        return f"{metadata['stage']}@{metadata['version']}"
    return path.name


def _check_batch(lr: np.ndarray) -> np.ndarray:
    lr = np.asarray(lr, dtype=np.float32)
    if lr.ndim != 4 or lr.shape[-1] != 1:
        raise ValueError(f"expected LR images of shape [batch, h, w, 1], got {lr.shape}")
    return lr


def tiles(height: int, width: int, tile: int, pad: int) -> list[tuple[tuple[int, int, int, int],
                                                                     tuple[int, int, int, int]]]:
    """Tile plan of an LR image: [(core, context), ...] as (y0, y1, x0, x1) in LR pixels.

    Cores cover the image without overlap (tile x tile, smaller at the right and
    bottom edges); each context is its core grown by `pad` on every side,
    clipped at the image border.
    """
    if tile <= 0:
        raise ValueError(f"tile must be positive, got {tile}")
    if pad < 0:
        raise ValueError(f"tile padding must be >= 0, got {pad}")
    plan = []
    for y0 in range(0, height, tile):
        for x0 in range(0, width, tile):
            y1, x1 = min(y0 + tile, height), min(x0 + tile, width)
            context = (max(y0 - pad, 0), min(y1 + pad, height), max(x0 - pad, 0), min(x1 + pad, width))
            plan.append(((y0, y1, x0, x1), context))
    return plan


# Resident memory of one whole-image call of the paper network per LR pixel (bytes): 6.8 GB for
# a 512x512 slice, measured with tools/bench_infer.py (the 2048x2048x64 HR activations dominate).
BYTES_PER_LR_PIXEL = 26_000
AUTO_TILES = (512, 384, 256, 192, 128, 96, 64)


def available_memory() -> int | None:
    """Bytes of memory available now (Linux MemAvailable), or None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def auto_tile(height: int, width: int, budget: int | None = None, pad: int = 16, batch: int = 4) -> int:
    """The tile `tile=None` uses for an LR image of height x width: 0 (whole) when its estimated
    memory (BYTES_PER_LR_PIXEL each) fits in `budget` bytes (default: half of the memory available
    now; 4 GiB where that is unknown), else the largest of AUTO_TILES whose `batch` tiles, each with
    `pad` pixels of context on every side (`upscale_image` runs them together), fit (at least 64)."""
    if budget is None:
        free = available_memory()
        budget = free // 2 if free else 4 << 30
    if height * width * BYTES_PER_LR_PIXEL <= budget:
        return 0
    per_call = max(batch, 1) * BYTES_PER_LR_PIXEL
    return next((t for t in AUTO_TILES if (t + 2 * pad) ** 2 * per_call <= budget), AUTO_TILES[-1])


def upscale_image(method: Method, lr: np.ndarray, tile: int | None = 0, pad: int = 16,
                  batch: int = 4) -> np.ndarray:
    """Super-resolve one LR image.

    Args:
        method: the SR method.
        lr: float32 [h, w] in [0, 1].
        tile: LR tile size; 0 runs the whole image at once; None chooses (`auto_tile`).
        pad: LR pixels of context around each tile.
        batch: tiles of equal size run together, up to this many.

    Returns:
        float32 [scale*h, scale*w] in [0, 1].
    """
    lr = np.asarray(lr, dtype=np.float32)
    if lr.ndim != 2:
        raise ValueError(f"expected one [h, w] image, got shape {lr.shape}")
    s = method.scale
    if tile is None:
        tile = auto_tile(*lr.shape, pad=pad, batch=batch) if method.name != BICUBIC else 0
    if tile <= 0 or (lr.shape[0] <= tile and lr.shape[1] <= tile):
        return method.predict(lr[None, :, :, None])[0, :, :, 0]
    out = np.empty((lr.shape[0] * s, lr.shape[1] * s), np.float32)
    groups: dict[tuple[int, int], list] = {}
    for core, ctx in tiles(lr.shape[0], lr.shape[1], tile, pad):
        groups.setdefault((ctx[1] - ctx[0], ctx[3] - ctx[2]), []).append((core, ctx))
    for items in groups.values():
        for start in range(0, len(items), max(batch, 1)):
            chunk = items[start:start + max(batch, 1)]
            inputs = np.stack([lr[c[0]:c[1], c[2]:c[3]] for _, c in chunk])[..., None]
            outputs = method.predict(inputs)[..., 0]
            for (core, ctx), sr in zip(chunk, outputs):
                y, x = (core[0] - ctx[0]) * s, (core[2] - ctx[2]) * s
                h, w = (core[1] - core[0]) * s, (core[3] - core[2]) * s
                out[core[0] * s:core[1] * s, core[2] * s:core[3] * s] = sr[y:y + h, x:x + w]
    return out
