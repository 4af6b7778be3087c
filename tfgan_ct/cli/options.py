"""Options shared by the commands."""
from __future__ import annotations

import functools

import click


def config_options(fn):
    """--config FILE and --set key=value, shared by every command."""
    @click.option("--config", "config_file", metavar="FILE|NAME",
                  help="YAML configuration, or a bundled one by name: paper, small, quickstart "
                       "(default: the paper's settings).")
    @click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                  help="Override one setting, e.g. --set convert.patch_size=64 (repeatable).")
    @functools.wraps(fn)
    def wrapper(*args, config_file=None, overrides=(), **kwargs):
        from tfgan_ct.config import load_config

        cfg = load_config(config_file, overrides)
        return fn(*args, cfg=cfg, **kwargs)
    return wrapper


class TileType(click.ParamType):
    """--tile: `auto` (None: whole images when they fit in memory, see inference.auto_tile) or an
    LR tile size in pixels (0: whole images)."""

    name = "auto|N"

    def convert(self, value, param, ctx):
        if value is None or (isinstance(value, str) and value.lower() == "auto"):
            return None
        try:
            number = int(value)
        except (TypeError, ValueError):
            self.fail(f"expected auto or a tile size in LR pixels, got {value!r}", param, ctx)
        if number < 0:
            self.fail(f"tile size must be >= 0, got {number}", param, ctx)
        return number


TILE = TileType()


# --tile and --tile-pad of the commands that upscale images for output (upscale, pacs).
AUTO_TILE_OPTION = click.option(
    "--tile", type=TILE, default="auto", show_default=True,
    help="LR tile size, bounding memory (0: whole image; auto: whole when it fits in half the "
         "free memory, else the largest tile that does).")
TILE_PAD_OPTION = click.option("--tile-pad", type=click.IntRange(min=0), default=16, show_default=True,
                               help="LR pixels of context around each tile.")
