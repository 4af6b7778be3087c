#!/usr/bin/env python
"""Write TensorFlow Serving's models.config for every stage exported under saved_models/.

One model per stage (natural, ncct, ctp, cta) that has at least one complete
export; each is served at its newest integer version. `--base-path` is where
the server sees the saved_models folder (the official Docker image mounts it
at /models, see tools/serving/README.md); `--base-path local` writes absolute
paths of this machine instead. `tfgan-ct serve config` does the same with
other defaults (absolute paths, printed).

Usage::

    python tools/serving/make_models_config.py [--models-dir saved_models] [--base-path /models]
        [--out saved_models/models.config]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    from tfgan_ct.deploy.serving.artefacts import ServingError, write_models_config
except ImportError:  # running from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tfgan_ct.deploy.serving.artefacts import ServingError, write_models_config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models-dir", default="saved_models", help="folder of <stage>/<version>/ exports")
    parser.add_argument("--base-path", default="/models",
                        help="saved_models as the server sees it (default /models); 'local' for absolute local paths")
    parser.add_argument("--out", default=None, help="output file (default: <models-dir>/models.config)")
    args = parser.parse_args(argv)
    out = Path(args.out or Path(args.models_dir) / "models.config")
    try:
        text = write_models_config(args.models_dir, None if args.base_path == "local" else args.base_path, out)
    except ServingError as exc:
        parser.exit(2, f"error: {exc}\n")
    print(f"wrote {out}:\n{text}", end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
