"""Typed configuration, loaded from a YAML file with `--set key=value` overrides.

The package ships three configurations in `tfgan_ct/configs/` (`paper`, `small`,
`quickstart`), loadable by name: `load_config("paper")`, `--config paper`. The
dataclass defaults are the paper's settings (`paper.yaml` spells them out).
Every command saves the resolved configuration beside its output as
`config.yaml`, so a result can always be traced back to its settings.

Unknown or mistyped keys are errors that name the key, e.g.
``convert.patch_sise: unknown key (did you mean 'patch_size'?)``, and every
loaded setting is checked (`Config.validate`, rules in `tfgan_ct.config_checks`),
e.g. ``modalities.ncct.window.width=0: must be a finite number > 0``.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from tfgan_ct import config_checks
from tfgan_ct.config_checks import ConfigError as ConfigError  # defined beside the checks, used from here


@dataclass
class Window:
    """Display window in HU; the model sees clip((HU - (center - width/2)) / width, 0, 1)."""

    center: float
    width: float

    @property
    def floor(self) -> float:
        """Lowest HU of the window (maps to 0)."""
        return self.center - self.width / 2

    def to_unit(self, hu):
        """HU -> [0, 1], clipped: a NumPy array (float32) or a float32 TensorFlow tensor."""
        unit = (hu - np.float32(self.floor)) * np.float32(1.0 / self.width)
        if type(unit).__module__.startswith("tensorflow"):
            import tensorflow as tf

            return tf.clip_by_value(unit, 0.0, 1.0)
        return np.clip(unit, 0.0, 1.0).astype(np.float32, copy=False)

    def from_unit(self, unit):
        """[0, 1] -> HU (the inverse of `to_unit` inside the window), same type as `unit`."""
        return unit * np.float32(self.width) + np.float32(self.floor)

    def contains(self, hu):
        """Where `hu` lies inside the window (floor <= HU <= floor + width), element-wise."""
        return (hu >= self.floor) & (hu <= self.floor + self.width)

    def as_dict(self) -> dict[str, float]:
        """{"center": C, "width": W}, as exports and manifests store it."""
        return {"center": self.center, "width": self.width}

    @classmethod
    def from_dict(cls, value: dict) -> "Window":
        """The window stored by `as_dict`."""
        return cls(float(value["center"]), float(value["width"]))


@dataclass
class ModalitySettings:
    """Per-modality window and brain-mask threshold (HU)."""

    window: Window
    mask_hu: tuple[float, float]


@dataclass
class Modalities:
    """Windows and mask thresholds of the three CT modalities and of natural images.

    Natural images are stored as "HU" 0..1000 (grey level x 1000), so the
    window 500/1000 maps them back to [0, 1].
    """

    ncct: ModalitySettings = field(default_factory=lambda: ModalitySettings(Window(40, 80), (-15.0, 100.0)))
    ctp: ModalitySettings = field(default_factory=lambda: ModalitySettings(Window(50, 100), (-15.0, 120.0)))
    cta: ModalitySettings = field(default_factory=lambda: ModalitySettings(Window(150, 500), (-15.0, 120.0)))
    natural: ModalitySettings = field(default_factory=lambda: ModalitySettings(Window(500, 1000), (-1.0, 1001.0)))

    def get(self, name: str) -> ModalitySettings:
        """Settings of modality `name` ('ncct', 'ctp', 'cta' or 'natural')."""
        if name not in {f.name for f in dataclasses.fields(self)}:
            raise ConfigError(f"unknown modality {name!r}")
        return getattr(self, name)


@dataclass
class ModalityRules:
    """How `--modality auto` classifies a series from its DICOM headers."""

    # CTP: this many different acquisition times (or more) at the same table position.
    ctp_min_timepoints: int = 3
    # CTA: one of these words in the series/study description or protocol
    # name, or a contrast agent named, together with thin slices.
    cta_keywords: list[str] = field(default_factory=lambda: ["CTA", "ANGIO", "ANGIOGRAPHY", "ARTERIAL"])
    cta_max_slice_thickness_mm: float = 1.5
    # ContrastBolusAgent values that mean "no contrast".
    no_contrast_values: list[str] = field(default_factory=lambda: ["", "NONE", "NO", "C-", "N/A", "NA"])


@dataclass
class MaskSettings:
    """Brain-mask morphology (radii in pixels of a 512-pixel slice; scaled with slice size)."""

    opening_radius: int = 2
    dilation_radius: int = 1
    fill_holes: bool = True


@dataclass
class ConvertSettings:
    """`tfgan-ct convert`: patches, splits and shards."""

    scale: int = 4
    patch_size: int = 128          # HR patch edge (pixels); LR patches are patch_size / scale
    patch_stride: int = 128        # HR stride between patches (pixels)
    min_mask_fraction: float = 0.5  # keep a training patch when more of it than this is brain
    split: str = "4:2:3"           # train:validation:test, patient counts or fractions
    seed: int = 0
    # Key of the salted hashes that stand in for patients and series in the
    # output. Empty: derived from the seed (reproducible, but then anyone who
    # knows a patient ID and the seed can recognise its hash). Set a secret
    # salt for data that leaves the hospital.
    salt: str = ""
    shard_size: int = 2048         # records per shard
    out_of_field_hu: float = -1500.0  # stored values at or below this are outside the scan field
    # NIfTI volumes whose values are not plausibly HU (no air, 8-bit data, ...) are skipped
    # (`not-hu`); false converts (and upscales) them as they are, taking the values as HU.
    require_hu: bool = True
    mask: MaskSettings = field(default_factory=MaskSettings)
    rules: ModalityRules = field(default_factory=ModalityRules)


@dataclass
class DataSettings:
    """Input pipeline (`tfgan_ct.data.pipeline`)."""

    batch_size: int = 16           # global batch (split over replicas)
    shuffle_buffer: int = 4096
    cycle_length: int = 4          # shards read in parallel
    augment: bool = True           # random flips and 90-degree rotations


@dataclass
class ModelSettings:
    """Network sizes (paper: ESRGAN's 23 RRDB blocks, 64 features, 32 growth channels)."""

    num_blocks: int = 23
    features: int = 64
    growth: int = 32
    d_features: int = 64
    # "imagenet" (Keras downloads it once), a local VGG19 weights file, or
    # "none" (random weights: tests only, logged loudly).
    vgg_weights: str = "imagenet"


@dataclass
class PhaseSettings:
    """One training phase: steps, initial learning rate, steps (within the phase) where it halves."""

    steps: int
    learning_rate: float
    milestones: list[int] = field(default_factory=list)


@dataclass
class CollapseSettings:
    """When a GAN phase counts as collapsed (`tfgan_ct.training.collapse`).

    The discriminator wins outright when its loss, averaged over a logging
    interval, falls below `d_loss_below` (RaGAN D loss: about 0.69 at balance)
    or the generator's adversarial loss rises above `g_adversarial_above`;
    validation has collapsed when its PSNR in the mask stays more than
    `psnr_drop_db` dB below the phase's best for `patience` validations in a row.
    """

    d_loss_below: float = 0.01
    g_adversarial_above: float = 20.0
    psnr_drop_db: float = 1.0
    patience: int = 3


@dataclass
class TrainSettings:
    """Training schedule, loss weights and bookkeeping."""

    # PSNR-oriented phase: L1 only (ESRGAN's pre-training), then the GAN phase.
    # The paper trains 20,000 iterations per stage; it does not say how many of
    # them are L1-only: here 2,000 L1 + 18,000 GAN steps (a project choice).
    l1_phase: PhaseSettings = field(default_factory=lambda: PhaseSettings(2000, 2e-4, [1000]))
    gan_phase: PhaseSettings = field(
        default_factory=lambda: PhaseSettings(18000, 1e-4, [5000, 10000, 15000]))
    perceptual_weight: float = 1.0
    adversarial_weight: float = 5e-3
    l1_weight: float = 1e-2
    beta_1: float = 0.9
    beta_2: float = 0.999
    mixed_precision: str = "float32"   # float32, mixed_float16 or mixed_bfloat16
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    log_every: int = 100
    eval_every: int = 1000
    eval_slices: int = 8               # validation slices scored / shown in TensorBoard
    seed: int = 0
    # The discriminator's initial learning rate in the GAN phase (halved at the phase's
    # milestones); null: gan_phase.learning_rate, as ESRGAN.
    d_learning_rate: float | None = None
    # Moving average of the generator's weights (BasicSR / Real-ESRGAN: 0.999); 0 turns it off.
    ema_decay: float = 0.999
    # Weights exported: ema, best (per phase, by validation PSNR in the mask), last;
    # auto: ema when ema_decay > 0, else last.
    export_weights: str = "auto"
    stop_on_collapse: bool = False     # end training at a collapse and export the best weights
    collapse: CollapseSettings = field(default_factory=CollapseSettings)

    @property
    def weights_to_export(self) -> str:
        """`export_weights` with 'auto' resolved: 'ema' when the moving average is on, else 'last'."""
        if self.export_weights != "auto":
            return self.export_weights
        return "ema" if self.ema_decay > 0 else "last"


@dataclass
class Config:
    """Everything a command needs; sections map to the top-level YAML keys."""

    modalities: Modalities = field(default_factory=Modalities)
    convert: ConvertSettings = field(default_factory=ConvertSettings)
    data: DataSettings = field(default_factory=DataSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    train: TrainSettings = field(default_factory=TrainSettings)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists), ready for YAML or JSON.

        A secret `convert.salt` is replaced by `REDACTED_SALT`: everything
        written from this dict (saved configs, run ids, export metadata) must
        not let someone with the data and a patient ID recompute its hash.
        """
        plain = _plain(dataclasses.asdict(self))
        if plain["convert"]["salt"]:
            plain["convert"]["salt"] = REDACTED_SALT
        return plain

    def validate(self) -> Config:
        """Check every setting; raises `ConfigError` naming the first bad key, its value and what is allowed.

        `load_config` calls it; call it again after changing settings in code.
        Returns the configuration itself.
        """
        config_checks.validate(self)
        return self

    def save(self, path: str | Path) -> None:
        """Write the resolved configuration as YAML (atomic)."""
        from tfgan_ct.fileio import atomic_write_text

        atomic_write_text(Path(path), yaml.safe_dump(self.to_dict(), sort_keys=False))


REDACTED_SALT = "<secret, not saved: pass it again with --set convert.salt=...>"


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def bundled_config(name: str) -> Path:
    """The configuration `name` shipped with the package ('paper', 'small', 'quickstart'; '.yaml' optional)."""
    file = name if name.endswith(".yaml") else f"{name}.yaml"
    resource = importlib.resources.files("tfgan_ct").joinpath("configs", file)
    if "/" in name or "\\" in name or not resource.is_file():
        raise ConfigError(f"{name}: no such bundled config (bundled: {', '.join(bundled_names())})")
    return Path(str(resource))


def bundled_names() -> list[str]:
    """Names of the configurations shipped with the package, e.g. ['paper', 'quickstart', 'small']."""
    folder = importlib.resources.files("tfgan_ct").joinpath("configs")
    return sorted(item.name[:-5] for item in folder.iterdir() if item.name.endswith(".yaml"))


def config_path(path: str | Path) -> Path:
    """`path` itself when it names a file; else, for a bare name such as 'paper', the bundled config."""
    path = Path(path)
    if path.is_file() or len(path.parts) != 1:
        return path
    try:
        return bundled_config(path.name)
    except ConfigError:
        return path


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load defaults, then the YAML file `path` (if any), then `key.sub=value` overrides; then validate.

    `path` is a file, or the name of a bundled config ('paper', 'small.yaml', ...; a file of
    that name in the working folder wins).
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = config_path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except OSError as exc:
            hint = f"; bundled configs: {', '.join(bundled_names())}" if len(path.parts) == 1 else ""
            raise ConfigError(f"{path}: cannot read config ({exc.strerror}{hint})") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
    for item in overrides:
        _apply_override(data, item)
    return build(Config, data, "").validate()


def _apply_override(data: dict[str, Any], item: str) -> None:
    """Apply one `a.b.c=value` override (value parsed as YAML) to the nested dict."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r}: expected key=value, e.g. convert.patch_size=64")
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part} is not a section")
    node[parts[-1]] = _Raw(raw.strip())


class _Raw(str):
    """An override value as typed on the command line; parsed once its type is known."""


def _parse_raw(value: Any, tp: Any) -> Any:
    """A string-typed setting keeps the text as typed (YAML would read 4:2:3 as 14583)."""
    if not isinstance(value, _Raw):
        return value
    if tp is str:
        return str(value)
    try:
        return yaml.safe_load(str(value)) if value else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot parse value {str(value)!r} ({exc})") from None


def build(cls: type, data: Any, where: str) -> Any:
    """Build dataclass `cls` from nested dict `data`, checking keys and types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(names)})"
            raise ConfigError(f"{_join(where, key)}: unknown key{hint}")
    defaults = cls() if _all_defaulted(cls) else None
    kwargs = {}
    for name in names:
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], _join(where, name),
                                    getattr(defaults, name, None))
        elif defaults is None:
            raise ConfigError(f"{_join(where, name)}: missing required key")
    return dataclasses.replace(defaults, **kwargs) if defaults is not None else cls(**kwargs)


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """`base` with `update` merged in, recursing into sub-mappings."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _all_defaulted(cls: type) -> bool:
    return all(f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
               for f in dataclasses.fields(cls))


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def _convert(tp: Any, value: Any, where: str, default: Any) -> Any:
    """Check/convert one value against type hint `tp`; nested dataclasses merge into `default`."""
    value = _parse_raw(value, tp)
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if default is not None and isinstance(value, dict):
            return build(tp, _deep_merge(dataclasses.asdict(default), value), where)
        return build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        return _convert(next(a for a in args if a is not type(None)), value, where, default)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(item, v, f"{where}[{i}]", None) for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_convert(a, v, f"{where}[{i}]", None) for i, (a, v) in enumerate(zip(args, value)))
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as text
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r} (quote it in YAML)")
        return value
    raise ConfigError(f"{where}: unsupported type {tp!r}")  # pragma: no cover - schema bug
