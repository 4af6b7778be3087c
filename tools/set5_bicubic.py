#!/usr/bin/env python
"""Check the bicubic x4 baseline on Set5 against the published figures.

The super-resolution literature (VDSR, LapSRN, EDSR, ESRGAN, ...) reports
bicubic x4 on Set5 as PSNR 28.42 dB / SSIM 0.8104. This script rebuilds that
number with the project's own ``imresize`` and metrics, as a check that both
follow the MATLAB protocol:

1. read the RGB PNG and crop it to a multiple of 4 ("modcrop");
2. LR = ``imresize(HR, 1/4, 'bicubic')`` rounded to uint8;
3. SR = ``imresize(LR, 4, 'bicubic')`` rounded to uint8;
4. Y = MATLAB ``rgb2ycbcr`` luma of SR and HR, rounded to uint8 as MATLAB
   does for uint8 input (BT.601, ``[16, 235]``);
5. shave 4 pixels on each side;
6. PSNR and SSIM (``data_range`` 255) on Y as float64.

Exit status is 1 when the mean is outside the tolerances.

Usage::

    python tools/set5_bicubic.py [--data DIR] [--tolerance-psnr 0.02]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tfgan_ct.data.resize import downscale, imresize_uint8, upscale  # noqa: E402
from tfgan_ct.evaluation.metrics import psnr, rgb_to_y, shave, ssim  # noqa: E402

SCALE = 4
PUBLISHED_PSNR = 28.42
PUBLISHED_SSIM = 0.8104
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "natural" / "Set5"


def modcrop(image: np.ndarray, scale: int) -> np.ndarray:
    """Crop the bottom/right so height and width are multiples of ``scale``."""
    height, width = image.shape[:2]
    return image[: height - height % scale, : width - width % scale]


def luma_uint8(rgb: np.ndarray) -> np.ndarray:
    """MATLAB ``rgb2ycbcr`` Y of a uint8 RGB image: rounded, as float64."""
    return imresize_uint8(rgb_to_y(rgb)).astype(np.float64)


def evaluate_image(hr_rgb: np.ndarray, scale: int = SCALE) -> tuple[float, float]:
    """Bicubic x``scale`` PSNR (dB) and SSIM on Y for one uint8 RGB image."""
    hr = modcrop(hr_rgb, scale)
    lr = imresize_uint8(downscale(hr, scale))
    sr = imresize_uint8(upscale(lr, scale))
    y_sr, y_hr = shave(luma_uint8(sr), scale), shave(luma_uint8(hr), scale)
    return psnr(y_sr, y_hr, data_range=255.0), ssim(y_sr, y_hr, data_range=255.0)


def evaluate_set5(folder) -> dict:
    """Bicubic x4 PSNR/SSIM for every PNG in ``folder``.

    Returns:
        ``{"images": {name: (psnr_db, ssim)}, "psnr": mean_db, "ssim": mean}``.
    """
    paths = sorted(Path(folder).glob("*.png"))
    if not paths:
        raise FileNotFoundError(f"no PNG images in {folder}")
    images = {}
    for path in paths:
        with Image.open(path) as img:
            rgb = np.asarray(img.convert("RGB"))
        images[path.stem] = evaluate_image(rgb)
    scores = np.array(list(images.values()))
    psnr_mean, ssim_mean = scores.mean(axis=0)
    return {"images": images, "psnr": float(psnr_mean), "ssim": float(ssim_mean)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of Set5 PNGs")
    parser.add_argument("--tolerance-psnr", type=float, default=0.02, help="dB")
    parser.add_argument("--tolerance-ssim", type=float, default=0.001)
    args = parser.parse_args(argv)

    result = evaluate_set5(args.data)
    print(f"{'image':<12}{'PSNR (dB)':>10}{'SSIM':>9}")
    for name, (p, s) in result["images"].items():
        print(f"{name:<12}{p:>10.4f}{s:>9.4f}")
    print(f"{'mean':<12}{result['psnr']:>10.4f}{result['ssim']:>9.4f}")
    print(f"{'published':<12}{PUBLISHED_PSNR:>10.2f}{PUBLISHED_SSIM:>9.4f}")

    ok = (
        abs(result["psnr"] - PUBLISHED_PSNR) <= args.tolerance_psnr
        and abs(result["ssim"] - PUBLISHED_SSIM) <= args.tolerance_ssim
    )
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
