"""Checks of every setting of a `Config`: types, ranges and the rules between settings.

`load_config` runs `validate` on what it loaded; code that changes a setting
afterwards (e.g. `--split` and `--seed` of the convert commands) calls
`Config.validate()` again. The first bad setting raises `ConfigError` with
the key, its value and what is allowed, e.g.
``modalities.ncct.window.width=0: must be a finite number > 0``.

`FIELD_RULES` holds one check per setting, by the name of its section's
dataclass; nested dataclasses (sections such as `convert.mask`) are walked
into. `CROSS_RULES` holds the checks that involve several settings of one
section. The rules go by class name so that this module does not import
`tfgan_ct.config` (which calls it): the two would import each other.
"""
from __future__ import annotations

import dataclasses
import math
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Callable

from tfgan_ct.errors import TfganError

if TYPE_CHECKING:  # annotations only
    from tfgan_ct.config import Config, PhaseSettings, TrainSettings


class ConfigError(TfganError, ValueError):
    """A configuration file or override that does not fit the schema (also `tfgan_ct.config.ConfigError`)."""


Check = Callable[[Any], "str | None"]  # value -> what is allowed (when the value breaks the rule), else None

SCALE = 4                 # the generator, the bicubic baseline and serving are all x4
DISCRIMINATOR_PATCH = 32  # the VGG-style discriminator halves the HR patch 5 times
MAX_SEED = 2**32 - 1      # NumPy's (and so Keras') seed range
AIR_HU = -1000.0
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")  # the Keras policies gan.py/train.py handle
VGG_SUFFIXES = (".h5", ".hdf5", ".keras")
EXPORT_WEIGHTS = ("auto", "ema", "best", "last")  # train.export_weights (tfgan_ct.training.selection)


def validate(cfg: Config) -> None:
    """Raise `ConfigError` for the first setting of `cfg` that cannot work."""
    _check_section(cfg, "")


def _check_section(section: Any, where: str) -> None:
    """Check the settings of one dataclass `section` (at key `where`), its sub-sections, then its cross rules."""
    rules = FIELD_RULES[type(section).__name__]
    for f in dataclasses.fields(section):
        key, value = f"{where}.{f.name}" if where else f.name, getattr(section, f.name)
        if f.name in rules:
            problem = rules[f.name](value)
            if problem:
                raise ConfigError(f"{key}={show(value)}: {problem}")
        elif dataclasses.is_dataclass(value) and type(value).__name__ in FIELD_RULES:
            _check_section(value, key)
        else:
            raise ConfigError(f"{key}={show(value)}: must be a section (a mapping of settings)")
    for rule in CROSS_RULES.get(type(section).__name__, ()):
        rule(section, where)


def show(value: Any) -> str:
    """A setting's value as a user would write it: 0 rather than 0.0, strings quoted."""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show(v) for v in value) + "]"
    return repr(value) if isinstance(value, str) else str(value)


# --- field checks -------------------------------------------------------------------------

def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(low: int, high: int | None = None) -> Check:
    """An integer >= `low` (and <= `high`)."""
    rule = f"must be an integer >= {low}" if high is None else f"must be an integer in [{low}, {high}]"
    return lambda v: None if _is_int(v) and v >= low and (high is None or v <= high) else rule


def _finite(gt: float | None = None, ge: float | None = None, lt: float | None = None,
            le: float | None = None, why: str = "") -> Check:
    """A finite number within the given bounds (gt: >, ge: >=, lt: <, le: <=)."""
    bounds = [(b, op) for b, op in ((gt, ">"), (ge, ">="), (lt, "<"), (le, "<=")) if b is not None]
    if len(bounds) == 2:
        (low, lop), (high, hop) = bounds
        rule = f"must be a finite number in {'(' if lop == '>' else '['}{low:g}, {high:g}{')' if hop == '<' else ']'}"
    else:
        rule = "must be a finite number" + "".join(f" {op} {b:g}" for b, op in bounds)
    rule += f" ({why})" if why else ""

    def check(value: Any) -> str | None:
        ok = _is_finite(value) and (gt is None or value > gt) and (ge is None or value >= ge) \
            and (lt is None or value < lt) and (le is None or value <= le)
        return None if ok else rule
    return check


def _one_of(*allowed: Any, rule: str = "") -> Check:
    rule = rule or "must be one of " + ", ".join(show(a) for a in allowed)
    return lambda v: None if v in allowed and type(v) in {type(a) for a in allowed} else rule


def _optional(check: Check) -> Check:
    """None (unset), or a value `check` accepts."""
    return lambda v: None if v is None else (lambda problem: problem and f"{problem}, or null")(check(v))


def _flag(value: Any) -> str | None:
    return None if isinstance(value, bool) else "must be true or false"


def _text(value: Any) -> str | None:
    return None if isinstance(value, str) else "must be a string"


def _texts(nonempty: bool) -> Check:
    rule = "must be a list of " + ("non-empty strings" if nonempty else "strings")
    return lambda v: None if isinstance(v, (list, tuple)) and all(
        isinstance(s, str) and (s or not nonempty) for s in v) else rule


def _hu_range(value: Any) -> str | None:
    """[low, high] HU of brain tissue before morphology."""
    ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(map(_is_finite, value)) \
        and value[0] < value[1]
    return None if ok else "must be [low, high]: two finite HU values with low < high"


def _patch_size(value: Any) -> str | None:
    """HR patch edge (pixels): x4 LR patches, and a size the discriminator can halve 5 times."""
    if not _is_int(value) or value <= 0 or value % SCALE:
        return f"must be a positive multiple of scale {SCALE}"
    if value % DISCRIMINATOR_PATCH:
        return f"must be a multiple of {DISCRIMINATOR_PATCH} (the discriminator halves the patch 5 times)"
    return None


def _patch_stride(value: Any) -> str | None:
    ok = _is_int(value) and value > 0 and value % SCALE == 0
    return None if ok else f"must be a positive multiple of scale {SCALE}"


def parse_ratio(text: str) -> tuple[Fraction, Fraction, Fraction]:
    """'4:2:3' or '0.6:0.2:0.2' as three fractions summing to 1 (`convert.split`; `data.splits` uses it)."""
    parts = text.split(":")
    try:
        values = [Fraction(p.strip()) for p in parts]
    except (ValueError, ZeroDivisionError):
        values = []
    if len(values) != 3 or any(v < 0 for v in values) or sum(values) == 0:
        raise ValueError(f"split {text!r}: expected train:validation:test, e.g. 4:2:3 or 0.6:0.2:0.2")
    total = sum(values)
    return tuple(v / total for v in values)  # type: ignore[return-value]


def _split(value: Any) -> str | None:
    """A train:validation:test ratio that `parse_ratio` reads."""
    try:
        parse_ratio(value)
        return None
    except (ValueError, AttributeError, TypeError):
        return ("must be train:validation:test, counts or fractions (none negative, not all 0), "
                "e.g. 4:2:3 or 0.6:0.2:0.2")


def _vgg_weights(value: Any) -> str | None:
    """'imagenet', 'none' or a weights file (whether it exists is checked when training starts)."""
    ok = isinstance(value, str) and (value in ("imagenet", "none") or value.endswith(VGG_SUFFIXES))
    return None if ok else ("must be 'imagenet', 'none' (tests only) or the path of a VGG19 weights file "
                            "(" + ", ".join(VGG_SUFFIXES) + ")")


def _milestones(value: Any) -> str | None:
    """Steps of the phase (1-based, increasing) after which the learning rate halves."""
    ok = isinstance(value, (list, tuple)) and all(_is_int(m) and m >= 1 for m in value) \
        and all(a < b for a, b in zip(value, value[1:]))
    return None if ok else "must be a list of increasing integers >= 1 (steps within the phase)"


_SEED = _integer(0, MAX_SEED)
_WEIGHT = _finite(ge=0)

FIELD_RULES: dict[str, dict[str, Check]] = {
    "Config": {},
    "Modalities": {},
    "Window": {"center": _finite(), "width": _finite(gt=0)},
    "ModalitySettings": {"mask_hu": _hu_range},
    "ModalityRules": {
        "ctp_min_timepoints": _integer(2),
        "cta_keywords": _texts(nonempty=True),
        "cta_max_slice_thickness_mm": _finite(gt=0),
        "no_contrast_values": _texts(nonempty=False),
    },
    "MaskSettings": {"opening_radius": _integer(0), "dilation_radius": _integer(0), "fill_holes": _flag},
    "ConvertSettings": {
        "scale": _one_of(SCALE, rule="only 4 is supported (the generator, the bicubic baseline and "
                                     "serving are all x4)"),
        "patch_size": _patch_size,
        "patch_stride": _patch_stride,
        "min_mask_fraction": _finite(ge=0, lt=1),
        "split": _split,
        "seed": _SEED,
        "salt": _text,
        "shard_size": _integer(1),
        "out_of_field_hu": _finite(le=AIR_HU, why="HU at or below air; higher values would turn tissue "
                                                  "into air"),
        "require_hu": _flag,
    },
    "DataSettings": {"batch_size": _integer(1), "shuffle_buffer": _integer(1), "cycle_length": _integer(1),
                   "augment": _flag},
    "ModelSettings": {"num_blocks": _integer(1), "features": _integer(1), "growth": _integer(1),
                    "d_features": _integer(1), "vgg_weights": _vgg_weights},
    "PhaseSettings": {"steps": _integer(0), "learning_rate": _finite(gt=0), "milestones": _milestones},
    "TrainSettings": {
        "perceptual_weight": _WEIGHT,
        "adversarial_weight": _WEIGHT,
        "l1_weight": _WEIGHT,
        "beta_1": _finite(ge=0, lt=1),
        "beta_2": _finite(ge=0, lt=1),
        "mixed_precision": _one_of(*PRECISIONS),
        "checkpoint_every": _integer(1),
        "keep_checkpoints": _integer(1),
        "log_every": _integer(1),
        "eval_every": _integer(1),
        "eval_slices": _integer(0),
        "seed": _SEED,
        "d_learning_rate": _optional(_finite(gt=0)),
        "ema_decay": _finite(ge=0, lt=1, why="0 turns the moving average off"),
        "export_weights": _one_of(*EXPORT_WEIGHTS),
        "stop_on_collapse": _flag,
    },
    "CollapseSettings": {
        "d_loss_below": _finite(ge=0),
        "g_adversarial_above": _finite(gt=0),
        "psnr_drop_db": _finite(gt=0),
        "patience": _integer(1),
    },
}


# --- rules between settings of one section -------------------------------------------------

def _milestones_within_phase(phase: PhaseSettings, where: str) -> None:
    """A milestone at or after the phase's last step would never apply (a phase of 0 steps is skipped)."""
    late = [m for m in phase.milestones if m >= phase.steps]
    if phase.steps and late:
        raise ConfigError(f"{where}.milestones={show(phase.milestones)}: must be < {where}.steps={phase.steps} "
                          f"(they count steps within the phase; shorten or empty the list)")


def _something_to_train(train: TrainSettings, where: str) -> None:
    """At least one step in total, and in the GAN phase a generator loss with some weight."""
    l1, gan = train.l1_phase.steps, train.gan_phase.steps
    if l1 + gan == 0:
        raise ConfigError(f"{where}.l1_phase.steps={l1} {where}.gan_phase.steps={gan}: their sum must be > 0 "
                          f"(with no step the exported model would be untrained)")
    weights = train.perceptual_weight + train.adversarial_weight + train.l1_weight
    if gan and weights == 0:
        raise ConfigError(f"{where}.perceptual_weight=0 {where}.adversarial_weight=0 {where}.l1_weight=0: "
                          f"at least one must be > 0 for the {gan} GAN phase step(s) to train the generator")


def _ema_to_export(train: TrainSettings, where: str) -> None:
    """Exporting the moving average needs one."""
    if train.export_weights == "ema" and train.ema_decay == 0:
        raise ConfigError(f"{where}.export_weights='ema' {where}.ema_decay=0: there is no moving average to "
                          f"export; set {where}.ema_decay (e.g. 0.999) or export 'best' or 'last'")


CROSS_RULES: dict[str, tuple[Callable[[Any, str], None], ...]] = {
    "PhaseSettings": (_milestones_within_phase,),
    "TrainSettings": (_something_to_train, _ema_to_export),
}
