"""Side-by-side comparison figure in the style of the paper's Fig. 2.

For each chosen slice one row of panels (LR upscaled with bicubic, each
method, ground truth), each with a box around a region of interest, and
below it a row with that region enlarged. Above every panel the method's
name, below it PSNR / SSIM inside the brain mask. Images are the [0, 1]
windowed slices, shown as 8-bit grey.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from tfgan_ct.deploy import inference
from tfgan_ct.evaluation import metrics
from tfgan_ct.evaluation.evaluate import Slice

log = logging.getLogger(__name__)

BOX_COLOUR = (255, 64, 64)
TEXT_COLOUR = (235, 235, 235)
BACKGROUND = (16, 16, 16)
MARGIN = 6


def save_png(image: Image.Image, path) -> None:
    """Write `image` as a PNG at `path` atomically (temporary name, then rename)."""
    import io

    from tfgan_ct.fileio import atomic_write_bytes

    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    atomic_write_bytes(Path(path), buffer.getvalue())


def pick_slices(slices: list[Slice], count: int) -> list[int]:
    """Indices of the `count` slices with the most brain, in their original order."""
    areas = np.array([s.mask.sum() for s in slices])
    return sorted(np.argsort(-areas, kind="stable")[:count].tolist())


def auto_roi(outputs: list[np.ndarray], mask: np.ndarray, size: int) -> tuple[int, int]:
    """Top-left (y, x) of the size x size HR region, mostly brain, where the outputs differ most.

    outputs: [0, 1] images [H, W] of the methods; the score is their per-pixel
    standard deviation averaged over the region.
    """
    spread = np.std(np.stack(outputs), axis=0)
    mean_spread = ndimage.uniform_filter(spread, size, mode="constant")
    brain = ndimage.uniform_filter(mask.astype(np.float32), size, mode="constant")
    score = np.where(brain > 0.5, mean_spread, -1.0)
    half = size // 2
    h, w = mask.shape
    valid = np.full_like(score, -2.0)
    valid[half:h - (size - half) + 1, half:w - (size - half) + 1] = \
        score[half:h - (size - half) + 1, half:w - (size - half) + 1]
    cy, cx = np.unravel_index(np.argmax(valid), valid.shape)
    return int(cy - half), int(cx - half)


def compare(slices: list[Slice], methods: list[inference.Method], count: int = 2,
            indices: list[int] | None = None, roi: tuple[int, int, int] | None = None,
            panel: int = 320, tile: int = 0, tile_pad: int = 16) -> Image.Image:
    """The comparison figure as an RGB image.

    Args:
        slices: candidate slices ([0, 1] images).
        methods: models to show (bicubic is added first if missing).
        count: how many slices when `indices` is not given (those with most brain).
        indices: positions in `slices` to show.
        roi: (y, x, size) in HR pixels for every slice; None picks it per slice.
        panel: width and height of each panel in screen pixels; a non-square slice is
            scaled to fit (aspect ratio kept) and padded with the background.
    """
    if not any(m.name == inference.BICUBIC for m in methods):
        methods = [inference.bicubic(), *methods]
    chosen = indices if indices is not None else pick_slices(slices, count)
    for i in chosen:
        if not 0 <= i < len(slices):
            raise ValueError(f"slice {i} does not exist (there are {len(slices)})")
    rows = [_slice_rows(slices[i], methods, roi, panel, tile, tile_pad) for i in chosen]
    titles = [("LR (bicubic)" if m.name == inference.BICUBIC else m.name) for m in methods] + ["Ground truth"]
    font = _font(max(12, panel // 22))
    header = _text_height(font) + 2 * MARGIN
    columns = len(titles)
    width = columns * panel + (columns + 1) * MARGIN
    height = header + len(rows) * (2 * panel + 2 * (_text_height(font) + 2 * MARGIN) + MARGIN)
    figure = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(figure)
    for c, title in enumerate(titles):
        _centered(draw, title, MARGIN + c * (panel + MARGIN), MARGIN, panel, font)
    y = header
    for full_row, zoom_row, captions in rows:
        for c, (full, zoom, caption) in enumerate(zip(full_row, zoom_row, captions)):
            x = MARGIN + c * (panel + MARGIN)
            figure.paste(full, (x, y))
            figure.paste(zoom, (x, y + panel + MARGIN))
            _centered(draw, caption, x, y + 2 * panel + 2 * MARGIN, panel, font)
        y += 2 * panel + 2 * (_text_height(font) + 2 * MARGIN) + MARGIN
    return figure


def _slice_rows(item: Slice, methods, roi, panel: int, tile: int, tile_pad: int):
    outputs = [np.clip(inference.upscale_image(m, item.lr, tile, tile_pad), 0, 1) for m in methods]
    size = roi[2] if roi else max(16, min(item.hr.shape) // 4)
    y, x = roi[:2] if roi else auto_roi(outputs, item.mask, size)
    if not (0 <= y and 0 <= x and y + size <= item.hr.shape[0] and x + size <= item.hr.shape[1]):
        raise ValueError(f"region {y},{x} size {size} lies outside the {item.hr.shape} slice")
    full_row, zoom_row, captions = [], [], []
    for image in [*outputs, item.hr]:
        fitted, geometry = _fit(_to_pil(image), panel)
        full_row.append(_boxed(fitted, (y, x, size), geometry, panel))
        zoom_row.append(_to_pil(image[y:y + size, x:x + size]).resize((panel, panel), Image.NEAREST)
                        .convert("RGB"))
    for image in outputs:
        captions.append(f"{metrics.psnr(image, item.hr, 1.0, mask=item.mask):.2f} dB / "
                        f"{metrics.ssim(image, item.hr, 1.0, mask=item.mask):.4f}")
    captions.append("PSNR / SSIM (brain)")
    return full_row, zoom_row, captions


def _to_pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8), "L")


def _fit(image: Image.Image, panel: int) -> tuple[Image.Image, tuple[float, float, int, int]]:
    """`image` scaled to fit a panel x panel square, aspect ratio kept, centred on BACKGROUND.

    Returns the RGB panel and its geometry (scale y, scale x, offset y, offset x):
    image pixel (y, x) lands at panel pixel (oy + y * fy, ox + x * fx).
    """
    width, height = image.size
    scale = panel / max(height, width)
    new_width = min(panel, max(1, round(width * scale)))
    new_height = min(panel, max(1, round(height * scale)))
    oy, ox = (panel - new_height) // 2, (panel - new_width) // 2
    out = Image.new("RGB", (panel, panel), BACKGROUND)
    out.paste(image.resize((new_width, new_height), Image.LANCZOS).convert("RGB"), (ox, oy))
    return out, (new_height / height, new_width / width, oy, ox)


def _boxed(image: Image.Image, roi, geometry, panel: int) -> Image.Image:
    """`image` (a panel from `_fit`) with the HR region roi = (y, x, size) outlined."""
    image = image.convert("RGB")
    y, x, size = roi
    fy, fx, oy, ox = geometry
    ImageDraw.Draw(image).rectangle([ox + x * fx, oy + y * fy,
                                     ox + (x + size) * fx - 1, oy + (y + size) * fy - 1],
                                    outline=BOX_COLOUR, width=max(2, panel // 160))
    return image


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow built without FreeType
        return ImageFont.load_default()


def _text_height(font) -> int:
    box = font.getbbox("Ag")
    return box[3] - box[1]


def _centered(draw: ImageDraw.ImageDraw, text: str, x: int, y: int, width: int, font) -> None:
    text_width = draw.textlength(text, font=font)
    draw.text((x + (width - text_width) / 2, y), text, fill=TEXT_COLOUR, font=font)
