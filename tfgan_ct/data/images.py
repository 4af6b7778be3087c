"""`tfgan-ct convert-images`: PNG/JPEG/BMP/TIFF folders -> shards for the `natural` stage.

The first stage of the chain learns from natural photographs (DIV2K in the
paper; any folder of images works). This is the image source of
`conversion.run_conversion`: the same shard format and manifest as CT, with
modality `natural`, so that `tfgan-ct train --stage natural` reads them like CT.

Intensities:
- every image becomes one grey image on [0, 1]: ITU-R BT.601 luma
  Y = 0.299 R + 0.587 G + 0.114 B of the colour channels on [0, 1];
  grey images are used directly; palette images are expanded to RGB (RGBA if
  they have transparency) first; CMYK and YCbCr are converted to RGB by Pillow;
- 8-bit channels are divided by 255, 16-bit grey (Pillow modes I;16*, and I
  holding values 0..65535) by 65535; 16-bit colour PNGs are read by Pillow as
  8-bit RGB; bilevel images become 0 and 1;
- alpha is composited on black: Y x alpha (a fully transparent pixel is 0);
- multi-frame files (TIFF) give their first frame; EXIF orientation is ignored;
- stored values are grey level x 1000 (config window `natural`: center 500,
  width 1000): HR is int16 round(Y x 1000) in 0..1000, cropped at the bottom
  and right to a multiple of the scale; LR is the MATLAB-style bicubic 1/scale
  (`resize.downscale`) of that HR, float32, same units; the mask is all ones.

Records: training images are cut into HR patches of `convert.patch_size`,
`convert.patch_stride` apart (every patch is kept, as in ESRGAN's own data
preparation); validation and test images are stored whole. Images smaller
than one patch are skipped. Each image is its own "patient": split, patient
and series hold salted hashes of its key (see `list_images`); no path or file
name goes into a shard or the manifest; `convert.log` names skipped files only.
"""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image

from tfgan_ct.config import Config, ConfigError
from tfgan_ct.data import resize, splits
from tfgan_ct.data.conversion import (
    ConvertError,
    ShardSet,
    SliceRecords,
    SliceResult,
    Summary,
    header_pass,
    manifest_dict,
    run_conversion,
    settings_entry,
    slice_records,
)
from tfgan_ct.data.dicom_files import Skipped
from tfgan_ct.data.shards import RecordMeta
from tfgan_ct.errors import TfganError

log = logging.getLogger("tfgan_ct.data.images")

MODALITY = "natural"
SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
STORED_MAX = 1000        # grey level 1.0 is stored as 1000
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights of R, G, B

_UINT16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_TO_RGB_MODES = ("CMYK", "YCbCr", "RGBX", "RGBa")
MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "I", *_UINT16_MODES, *_TO_RGB_MODES)


class ImageError(TfganError, ValueError):
    """An image file that cannot be used; the message is the reason logged, `code` the
    reason code it is counted by (`not-image`, `empty-file`, `corrupt-image`,
    `unsupported-mode`, `too-large`)."""

    def __init__(self, reason: str, code: str = "not-image"):
        super().__init__(reason)
        self.code = code


@dataclass(frozen=True)
class ImageFile:
    """One candidate input: its path and its key (path relative to its input folder, see `list_images`)."""

    path: str
    key: str


@dataclass
class ImagePlan:
    """One image to convert and where it goes."""

    file: ImageFile
    split: str
    patient_hash: str
    series_hash: str
    size: tuple[int, int]  # (height, width) in pixels, before cropping
    mode: str              # Pillow mode of the file
    converted: bool = False  # set once its records are written (a file can still fail to decode)


# ---------------------------------------------------------------- pixels


def to_grey(image: Image.Image) -> np.ndarray:
    """Grey level of a loaded Pillow image: float64 (H, W) on [0, 1] (see the module docstring).

    Raises ImageError for modes without a known range (e.g. F, 32-bit I beyond 0..65535).
    """
    mode = image.mode
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode == "PA":
        image = image.convert("RGBA")
    elif mode in _TO_RGB_MODES:
        image = image.convert("RGB")
    mode = image.mode
    if mode == "1":
        return np.asarray(image, dtype=np.float64)
    if mode in ("L", "LA", "RGB", "RGBA"):
        array = np.asarray(image)  # uint8, (H, W) or (H, W, channels)
        if array.ndim == 2:
            return array / 255.0
        grey = array[..., 0] / 255.0 if mode == "LA" else luma(array[..., :3]) / 255.0
        if mode.endswith("A"):
            grey *= array[..., -1] / 255.0
        return grey
    if mode in _UINT16_MODES or mode == "I":
        array = np.asarray(image).astype(np.float64)
        if mode == "I" and array.size and (array.min() < 0 or array.max() > 65535):
            raise ImageError("unsupported image mode (32-bit integers beyond 0..65535)", "unsupported-mode")
        return array / 65535.0
    raise ImageError(f"unsupported image mode ({mode})", "unsupported-mode")


def luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma 0.299 R + 0.587 G + 0.114 B of RGB (..., 3), float64 in the units of `rgb`."""
    return LUMA[0] * rgb[..., 0] + LUMA[1] * rgb[..., 1] + LUMA[2] * rgb[..., 2]


def stored_hr(grey: np.ndarray, scale: int) -> np.ndarray:
    """Grey [0, 1] (H, W) -> HR as stored: int16 round(grey x 1000), cropped to multiples of `scale`."""
    height, width = grey.shape
    grey = grey[: height - height % scale, : width - width % scale]
    return np.rint(np.clip(grey, 0.0, 1.0) * STORED_MAX).astype(np.int16)


def image_pair(grey: np.ndarray, scale: int) -> SliceResult:
    """HR, LR and mask of one grey [0, 1] image (see `stored_hr`; LR = bicubic 1/scale of HR, float32)."""
    hr = stored_hr(grey, scale)
    lr = resize.downscale(hr.astype(np.float64), scale).astype(np.float32)
    return SliceResult(0, hr, lr, np.ones(hr.shape, dtype=bool), (0.0, 0.0))


def read_grey(path: str | Path) -> np.ndarray:
    """Decode the image file at `path` to grey float64 (H, W) on [0, 1]; ImageError if unusable."""
    with _open(path) as image:
        try:
            image.load()
        except (OSError, ValueError, SyntaxError) as exc:
            raise ImageError(f"truncated or corrupt image ({_short(exc)})", "corrupt-image") from None
        return to_grey(image)


def _open(path: str | Path) -> Image.Image:
    """Pillow image of `path` (frame 0, pixels not read yet); ImageError if not an image."""
    if os.path.getsize(path) == 0:
        raise ImageError("empty file", "empty-file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(path)
    except Image.UnidentifiedImageError:
        raise ImageError("not an image file (format not recognised)") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image too large ({_short(exc)})", "too-large") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"not an image file ({_short(exc)})") from None


def _short(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text.replace(os.fspath(Path.cwd()) + os.sep, "")[:120]


# ---------------------------------------------------------------- files and plans


def list_images(inputs: Iterable[str | Path]) -> tuple[list[ImageFile], int]:
    """Image files (by suffix, any case) under `inputs` (folders searched recursively, or files),
    and the number of other files in the folders (ignored).

    Keys are POSIX paths relative to the input folder, or a file's own name for
    a file input, so a folder and a shell glob of its files (`DIR/*.png`) give
    the same keys, whatever the order of the inputs. A file reached through
    several inputs keeps its longest key (the one relative to the outermost
    folder). Only when different files get the same key are those keys prefixed
    by the name of their input folder (a file input's parent folder); if that
    is still ambiguous, ConvertError names both files.
    """
    inputs = [Path(i) for i in inputs]
    for item in inputs:
        if not item.exists():
            raise FileNotFoundError(f"{item}: no such file or folder")
    found, others = _found_images(inputs)
    final = _unique_keys(found)
    files = [ImageFile(found[r][2], final[r]) for r in sorted(final, key=lambda r: final[r])]
    return files, others


def _found_images(inputs: list[Path]) -> tuple[dict[Path, tuple[str, str, str]], int]:
    """Every image file under `inputs` once, resolved -> (key, root folder name, path as
    given), and the number of other files in the folders."""
    keys: dict[Path, tuple[str, str, str]] = {}
    others: set[Path] = set()
    for item in inputs:
        if item.is_dir():
            candidates = sorted(p for p in item.rglob("*") if p.is_file())
            others.update(p.resolve() for p in candidates if p.suffix.lower() not in SUFFIXES)
            candidates = [p for p in candidates if p.suffix.lower() in SUFFIXES]
            root = item
        else:
            candidates, root = [item], item.parent
        root_name = root.resolve().name or root.resolve().as_posix()
        for path in candidates:
            key = path.relative_to(root).as_posix()
            entry = (key, root_name, str(path))
            resolved = path.resolve()
            if resolved not in keys or _preferred(entry, keys[resolved]):
                keys[resolved] = entry
    return keys, len(others)


def _unique_keys(found: dict[Path, tuple[str, str, str]]) -> dict[Path, str]:
    """Final key of each file: its key, prefixed by its root folder name where keys collide;
    ConvertError when two files still get the same key."""
    by_key: dict[str, list[Path]] = {}
    for resolved, (key, _, _) in found.items():
        by_key.setdefault(key, []).append(resolved)
    final: dict[Path, str] = {}
    for key, group in by_key.items():
        for resolved in group:
            final[resolved] = key if len(group) == 1 else f"{found[resolved][1]}/{key}"
    owner: dict[str, Path] = {}
    for resolved in sorted(final, key=lambda r: (final[r], found[r][2])):
        key = final[resolved]
        if key in owner:
            raise ConvertError(f"two input files get the same key {key!r}: {found[owner[key]][2]} and "
                               f"{found[resolved][2]}; give their folders different names or pass a "
                               "common parent folder")
        owner[key] = resolved
    return final


def _preferred(new: tuple[str, str, str], old: tuple[str, str, str]) -> bool:
    """Whether `new` is the better (key, root name, path) for a file reached twice: longest key."""
    return (new[0].count("/"), new[0], new[2]) > (old[0].count("/"), old[0], old[2])


def inspect(file: ImageFile) -> tuple[ImageFile, tuple[int, int], str] | Skipped:
    """Worker: (file, (height, width), mode) from the header, or Skipped.

    PNG files are also checked chunk by chunk (CRCs, truncation) without decoding.
    """
    try:
        with _open(file.path) as image:
            size, mode = (image.height, image.width), image.mode
            if mode not in MODES:
                raise ImageError(f"unsupported image mode ({mode})", "unsupported-mode")
            if image.format == "PNG":
                try:
                    image.verify()
                except (OSError, ValueError, SyntaxError) as exc:
                    raise ImageError(f"truncated or corrupt image ({_short(exc)})", "corrupt-image") from None
    except ImageError as exc:
        return Skipped(file.key, str(exc), exc.code)
    except OSError as exc:
        return Skipped(file.key, f"unreadable file ({exc.strerror or exc})", "unreadable")
    return file, size, mode


def scan_images(inputs, pool, cfg: Config, progress: bool) -> tuple[list[tuple], list[Skipped]]:
    """Header pass over every image file (in `pool`); logs one line per skipped file."""
    try:
        files, others = list_images(inputs)
    except FileNotFoundError as exc:
        raise ConvertError(str(exc)) from None
    if others:
        log.info("%d file(s) without an image suffix (%s) ignored", others, " ".join(SUFFIXES))
    usable, skipped = [], []
    patch = cfg.convert.patch_size
    for result in header_pass(pool, inspect, files, 8, "checking images", "image", progress):
        if not isinstance(result, Skipped) and min(result[1]) < patch:
            height, width = result[1]
            result = Skipped(result[0].key, f"image too small ({height}x{width}, one patch is {patch}x{patch})",
                             "too-small")
        if isinstance(result, Skipped):
            _log_skipped(result)
            skipped.append(result)
        else:
            usable.append(result)
    return usable, skipped


def _log_skipped(item: Skipped) -> None:
    log.warning("skipped %s: [%s] %s", item.path, item.code, item.reason)


def plan_images(usable: list[tuple], cfg: Config, salt: str, split_csv: str | Path | None) -> list[ImagePlan]:
    """Split by image and order the images by salted hash (reproducible for a seed or salt)."""
    keys = [file.key for file, _, _ in usable]
    if split_csv is not None:
        try:
            split_of = splits.read_split_csv(split_csv)
        except ValueError as exc:
            raise ConvertError(str(exc)) from None
        missing = [k for k in keys if k not in split_of]
        if missing:
            log.warning("%d image(s) not in the split CSV; left out", len(missing))
    else:
        try:
            split_of = splits.assign_by_ratio(keys, cfg.convert.split, salt)
        except ValueError as exc:
            raise ConfigError(f"convert.split: {exc}") from None
    plans = [ImagePlan(file, split_of[file.key], splits.salted_hash("patient:" + file.key, salt),
                       splits.salted_hash("series:" + file.key, salt), size, mode)
             for file, size, mode in usable if file.key in split_of]
    plans.sort(key=lambda p: splits.salted_hash("order:" + p.file.key, salt))
    for plan in plans:
        log.debug("image %s: %dx%d %s, %s split", plan.series_hash, *plan.size, plan.mode, plan.split)
    return plans


# ---------------------------------------------------------------- records and shards


@dataclass
class _Task:
    """One image for one worker call."""

    index: int
    path: str
    key: str
    meta: RecordMeta
    cfg: Config


def process_image(task: _Task) -> tuple[int, list[bytes] | Skipped]:
    """Worker: decode, convert to grey, resize and serialise one image's records."""
    try:
        grey = read_grey(task.path)
    except ImageError as exc:
        return task.index, Skipped(task.key, str(exc), exc.code)
    except OSError as exc:
        return task.index, Skipped(task.key, f"unreadable file ({exc.strerror or exc})", "unreadable")
    return task.index, slice_records(image_pair(grey, task.cfg.convert.scale), task.meta, task.cfg)


def write_image_shards(plans: list[ImagePlan], cfg: Config, stage: Path, pool, summary: Summary,
                       progress: bool) -> dict[str, list[dict]]:
    """Run the image tasks in `pool` and write their records, in plan order, to per-split shards."""
    from tqdm import tqdm

    tasks = (_Task(i, p.file.path, p.file.key, RecordMeta(MODALITY, p.split, p.patient_hash, p.series_hash, 0),
                   cfg) for i, p in enumerate(plans))
    shards = ShardSet(stage, cfg.convert.shard_size, summary)
    bar = tqdm(total=len(plans), desc="converting", unit="image", disable=not progress)
    for index, result in pool.imap(process_image, tasks):
        bar.update()
        if isinstance(result, Skipped):
            _log_skipped(result)
            summary.skipped.append(result)
            continue
        plans[index].converted = True
        shards.add(plans[index].split, MODALITY, SliceRecords(0, result, has_brain=True))
    bar.close()
    return shards.close()


def build_image_manifest(plans: list[ImagePlan], shards: dict[str, list[dict]], summary: Summary,
                         cfg: Config, split_csv) -> dict:
    """manifest.json of a natural-image dataset: the CT manifest's layout, one series per image."""
    series = [{"series": p.series_hash, "patient": p.patient_hash, "modality": MODALITY,
               "modality_reason": f"natural image ({p.mode})", "split": p.split, "images": 1}
              for p in plans if p.converted]
    manifest = manifest_dict(series, shards, summary, cfg, settings_entry(cfg, MODALITY, split_csv))
    manifest["source"] = "images"
    return manifest


def convert_images(inputs: Iterable[str | Path], out: str | Path, cfg: Config,
                   split_csv: str | Path | None = None, workers: int | None = None,
                   overwrite: bool = False, progress: bool = True) -> Summary:
    """Convert the image files under `inputs` into a `natural` shard dataset at `out`.

    Raises ConvertError when nothing usable is found, `out` is not empty (without
    `overwrite`), or the split CSV is unreadable; ConfigError for bad patch or split
    settings. `Summary.slices` counts images.
    """
    return run_conversion(ImageSource(cfg, split_csv), inputs, out, cfg, workers, overwrite, progress)


@dataclass
class ImageSource:
    """Image files as a `conversion.Source`: one grey image per file."""

    cfg: Config
    split_csv: str | Path | None = None
    unit = "image"
    nothing_found = "no usable images found"

    def scan(self, inputs, pool, progress: bool) -> tuple[list[tuple], list[Skipped]]:
        return scan_images(inputs, pool, self.cfg, progress)

    def plan(self, usable, skipped, salt: str) -> list[ImagePlan]:
        plans = plan_images(usable, self.cfg, salt, self.split_csv)
        if plans:
            per_split = {s: sum(p.split == s for p in plans) for s in splits.SPLITS}
            log.info("%d image(s): %s; %d file(s) skipped", len(plans),
                     ", ".join(f"{n} {s}" for s, n in per_split.items()), len(skipped))
        return plans

    def write(self, plans, stage: Path, pool, summary: Summary, progress: bool) -> dict[str, list[dict]]:
        return write_image_shards(plans, self.cfg, stage, pool, summary, progress)

    def nothing_written(self, summary: Summary, where: str) -> str:
        return f"{self.nothing_found} in {where}"

    def manifest(self, plans, shards, summary: Summary) -> dict:
        return build_image_manifest(plans, shards, summary, self.cfg, self.split_csv)
