"""scikit-image's bundled sample photographs, as PNG files for the `natural` stage of the demo."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger("tfgan_ct.demo.sample_images")

# scikit-image photographs that ship inside its wheel (no download needed),
# by fetcher name and bundled file name.
SAMPLE_IMAGES = {
    "astronaut": "astronaut.png", "camera": "camera.png", "chelsea": "chelsea.png",
    "coffee": "coffee.png", "rocket": "rocket.jpg", "coins": "coins.png", "moon": "moon.png",
    "grass": "grass.png", "gravel": "gravel.png", "brick": "brick.png",
    "hubble_deep_field": "hubble_deep_field.jpg", "immunohistochemistry": "ihc.png",
}


def write_sample_images(out_dir: str | Path) -> list[Path]:
    """Save scikit-image's bundled sample photographs to `out_dir` as `<name>.png`.

    Only images whose file ships inside the installed scikit-image package are
    used, so nothing is downloaded; an image that cannot be loaded is left out
    (logged). Returns the written paths in name order (RGB or grey 8-bit PNGs,
    sizes from 303x384 to 872x1000).
    """
    import skimage.data

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bundled = Path(skimage.data.__file__).parent
    written = []
    for name, filename in sorted(SAMPLE_IMAGES.items()):
        if not (bundled / filename).is_file():
            log.info("sample image %s is not bundled with this scikit-image; left out", name)
            continue
        try:
            array = getattr(skimage.data, name)()
        except Exception as exc:  # noqa: BLE001 - any loader failure just leaves the image out
            log.warning("sample image %s could not be loaded (%s); left out", name, exc)
            continue
        path = out_dir / f"{name}.png"
        Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)
        written.append(path)
    return written
