import dataclasses
import re
import typing

import pytest
import yaml

from tfgan_ct.config import Config, ConfigError, bundled_config, bundled_names, load_config

from helpers import REPO, SMALL_CONFIG


def test_paper_yaml_matches_defaults():
    assert load_config(bundled_config("paper")) == Config()


def test_bundled_configs_load_by_name_and_by_file(tmp_path, monkeypatch):
    assert bundled_names() == ["paper", "quickstart", "small"]
    assert bundled_config("small.yaml") == bundled_config("small") == SMALL_CONFIG
    assert load_config("small") == load_config("small.yaml") == load_config(SMALL_CONFIG)
    # A checkout keeps `configs/` (a link to the package's folder), as the README's first steps use.
    assert load_config(REPO / "configs" / "small.yaml") == load_config("small")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "small.yaml").write_text("convert:\n  patch_size: 64\n")
    assert load_config("small.yaml").convert.patch_size == 64  # a file of that name wins
    with pytest.raises(ConfigError, match="nope.yaml: cannot read config .*bundled configs: paper, quickstart, small"):
        load_config("nope.yaml")
    with pytest.raises(ConfigError, match="no such bundled config"):
        bundled_config("../small")


def test_small_config_and_overrides():
    cfg = load_config(SMALL_CONFIG,
                      ["convert.mask.opening_radius=3", "modalities.ncct.window.center=35"])
    assert cfg.convert.patch_size == 32
    assert cfg.convert.mask.opening_radius == 3
    assert cfg.convert.mask.dilation_radius == 1  # untouched sibling keeps its default
    assert cfg.modalities.ncct.window.center == 35.0 and cfg.modalities.ncct.window.width == 80.0


def test_split_override_stays_text():
    # YAML 1.1 would read 4:2:3 as the sexagesimal number 14583.
    assert load_config(None, ["convert.split=4:2:3"]).convert.split == "4:2:3"


def test_bad_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("convert:\n  split: 4:2:3\n")  # unquoted: YAML makes it a number
    with pytest.raises(ConfigError, match="convert.split: expected a string"):
        load_config(path)
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(path)


def test_save_round_trip(tmp_path):
    cfg = load_config(None, ["convert.seed=7"])
    cfg.save(tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["convert"]["seed"] == 7


# --- every setting is checked when the configuration is loaded -----------------------------

@pytest.mark.parametrize("name", ["paper", "small", "quickstart"])
def test_shipped_configs_pass_the_checks(name):
    load_config(name).validate()


def test_defaults_pass_the_checks():
    assert Config().validate() == Config()


def test_every_setting_has_a_check():
    from tfgan_ct.config_checks import FIELD_RULES

    sections = [Config]
    while sections:
        cls = sections.pop()
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                sections.append(hints[f.name])
            else:
                assert f.name in FIELD_RULES[cls.__name__], f"{cls.__name__}.{f.name} has no check"


# The cases, each with the message that names key, value and what is allowed.
@pytest.mark.parametrize("overrides, message", [
    (["train.l1_phase.steps=-5", "train.gan_phase.steps=0"], "train.l1_phase.steps=-5: must be an integer >= 0"),
    (["train.l1_phase.steps=0", "train.gan_phase.steps=0"],
     "train.l1_phase.steps=0 train.gan_phase.steps=0: their sum must be > 0"),
    (["modalities.ncct.window.width=0"], "modalities.ncct.window.width=0: must be a finite number > 0"),
    (["modalities.ncct.window.width=-80"], "modalities.ncct.window.width=-80: must be a finite number > 0"),
    (["modalities.ctp.window.width=.nan"], "modalities.ctp.window.width=nan: must be a finite number > 0"),
    (["convert.out_of_field_hu=.nan"], "convert.out_of_field_hu=nan: must be a finite number <= -1000"),
    (["train.checkpoint_every=0"], "train.checkpoint_every=0: must be an integer >= 1"),
    (["train.log_every=0"], "train.log_every=0: must be an integer >= 1"),
    (["data.batch_size=0"], "data.batch_size=0: must be an integer >= 1"),
    (["train.mixed_precision=bogus"],
     "train.mixed_precision='bogus': must be one of 'float32', 'mixed_float16', 'mixed_bfloat16'"),
    (["modalities.ncct.mask_hu=[100, -15]"],
     "modalities.ncct.mask_hu=[100, -15]: must be [low, high]: two finite HU values with low < high"),
])
def test_reported_bad_settings(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides)


@pytest.mark.parametrize("override, message", [
    # modalities
    ("modalities.cta.window.center=.inf", "modalities.cta.window.center=inf: must be a finite number"),
    ("modalities.natural.mask_hu=[0, .nan]", "modalities.natural.mask_hu=[0, nan]: must be [low, high]"),
    ("modalities.ctp.mask_hu=[20, 20]", "modalities.ctp.mask_hu=[20, 20]: must be [low, high]"),
    # convert
    ("convert.scale=2", "convert.scale=2: only 4 is supported"),
    ("convert.patch_size=0", "convert.patch_size=0: must be a positive multiple of scale 4"),
    ("convert.patch_size=30", "convert.patch_size=30: must be a positive multiple of scale 4"),
    ("convert.patch_size=48", "convert.patch_size=48: must be a multiple of 32"),
    ("convert.patch_stride=-4", "convert.patch_stride=-4: must be a positive multiple of scale 4"),
    ("convert.patch_stride=6", "convert.patch_stride=6: must be a positive multiple of scale 4"),
    ("convert.min_mask_fraction=1", "convert.min_mask_fraction=1: must be a finite number in [0, 1)"),
    ("convert.min_mask_fraction=-0.1", "convert.min_mask_fraction=-0.1: must be a finite number in [0, 1)"),
    ("convert.split=4:2", "convert.split='4:2': must be train:validation:test"),
    ("convert.split=0:0:0", "convert.split='0:0:0': must be train:validation:test"),
    ("convert.split=4:-1:3", "convert.split='4:-1:3': must be train:validation:test"),
    ("convert.seed=-1", "convert.seed=-1: must be an integer in [0, 4294967295]"),
    ("convert.shard_size=0", "convert.shard_size=0: must be an integer >= 1"),
    ("convert.out_of_field_hu=-15", "convert.out_of_field_hu=-15: must be a finite number <= -1000"),
    ("convert.mask.opening_radius=-1", "convert.mask.opening_radius=-1: must be an integer >= 0"),
    ("convert.mask.dilation_radius=-2", "convert.mask.dilation_radius=-2: must be an integer >= 0"),
    ("convert.rules.ctp_min_timepoints=1", "convert.rules.ctp_min_timepoints=1: must be an integer >= 2"),
    ("convert.rules.cta_keywords=[CTA, '']", "convert.rules.cta_keywords=['CTA', '']: must be a list of non-empty"),
    ("convert.rules.cta_max_slice_thickness_mm=0",
     "convert.rules.cta_max_slice_thickness_mm=0: must be a finite number > 0"),
    # data
    ("data.shuffle_buffer=0", "data.shuffle_buffer=0: must be an integer >= 1"),
    ("data.cycle_length=0", "data.cycle_length=0: must be an integer >= 1"),
    # model
    ("model.num_blocks=0", "model.num_blocks=0: must be an integer >= 1"),
    ("model.features=-64", "model.features=-64: must be an integer >= 1"),
    ("model.growth=0", "model.growth=0: must be an integer >= 1"),
    ("model.d_features=0", "model.d_features=0: must be an integer >= 1"),
    ("model.vgg_weights=imagnet", "model.vgg_weights='imagnet': must be 'imagenet', 'none'"),
    # train: phases
    ("train.gan_phase.learning_rate=0", "train.gan_phase.learning_rate=0: must be a finite number > 0"),
    ("train.l1_phase.learning_rate=.nan", "train.l1_phase.learning_rate=nan: must be a finite number > 0"),
    ("train.gan_phase.milestones=[5000, 5000]", "train.gan_phase.milestones=[5000, 5000]: must be a list of "
                                                "increasing integers >= 1"),
    ("train.gan_phase.milestones=[0]", "train.gan_phase.milestones=[0]: must be a list of increasing"),
    ("train.l1_phase.steps=500", "train.l1_phase.milestones=[1000]: must be < train.l1_phase.steps=500"),
    # train: the rest
    ("train.perceptual_weight=-1", "train.perceptual_weight=-1: must be a finite number >= 0"),
    ("train.adversarial_weight=.nan", "train.adversarial_weight=nan: must be a finite number >= 0"),
    ("train.l1_weight=-0.01", "train.l1_weight=-0.01: must be a finite number >= 0"),
    ("train.beta_1=1", "train.beta_1=1: must be a finite number in [0, 1)"),
    ("train.beta_2=-0.5", "train.beta_2=-0.5: must be a finite number in [0, 1)"),
    ("train.mixed_precision=float16", "train.mixed_precision='float16': must be one of"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints=0: must be an integer >= 1"),
    ("train.eval_every=0", "train.eval_every=0: must be an integer >= 1"),
    ("train.eval_slices=-1", "train.eval_slices=-1: must be an integer >= 0"),
    ("train.seed=4294967296", "train.seed=4294967296: must be an integer in [0, 4294967295]"),
    # overrides that do not fit the schema at all
    ("convert.patch_sise=3", "convert.patch_sise: unknown key (did you mean 'patch_size'?)"),
    ("convert.patch_size=abc", "convert.patch_size: expected an integer"),
    ("data.augment=3", "data.augment: expected true or false"),
    ("nonsense=1", "nonsense: unknown key"),
    ("no_equals_sign", "expected key=value"),
])
def test_each_setting_is_checked(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


@pytest.mark.parametrize("overrides", [
    ["convert.split=0.6:0.2:0.2"], ["convert.split=0:0:1"], ["train.gan_phase.steps=0"],
    ["train.l1_phase.steps=0"], ["train.eval_slices=0"], ["convert.mask.opening_radius=0"],
    ["convert.rules.cta_keywords=[]"], ["model.vgg_weights=/models/vgg19.weights.h5"],
    ["train.mixed_precision=mixed_bfloat16"], ["train.gan_phase.milestones=[15000, 17999]"],
    # a milestone beyond a phase that is skipped (0 steps) never applies, and is not an error
    ["train.gan_phase.steps=0", "train.gan_phase.milestones=[99999]"],
])
def test_settings_at_the_edges_are_accepted(overrides):
    load_config(None, overrides)


def test_gan_phase_needs_a_generator_loss():
    zero = ["train.perceptual_weight=0", "train.adversarial_weight=0", "train.l1_weight=0"]
    with pytest.raises(ConfigError, match=r"train.perceptual_weight=0 .* at least one must be > 0"):
        load_config(None, zero)
    load_config(None, [*zero, "train.gan_phase.steps=0"])  # an L1-only run does not use them


def test_settings_changed_in_code_are_checked_again():
    cfg = load_config(SMALL_CONFIG)
    cfg.convert.split = "4:2"  # as `--split` does after loading
    with pytest.raises(ConfigError, match=re.escape("convert.split='4:2': must be train:validation:test")):
        cfg.validate()
    cfg.convert.split, cfg.convert.seed = "1:1:1", "7"
    with pytest.raises(ConfigError, match=re.escape("convert.seed='7': must be an integer")):
        cfg.validate()
    cfg.convert.seed = True  # a bool is not an integer setting
    with pytest.raises(ConfigError, match="convert.seed=True: must be an integer"):
        cfg.validate()
    cfg.convert.seed = 7
    cfg.modalities.ncct.mask_hu = (-15, 100)
    assert cfg.validate() is cfg


def test_a_bad_file_setting_is_one_clean_line_on_the_command_line(tmp_path):
    from click.testing import CliRunner

    from tfgan_ct.cli import main

    path = tmp_path / "c.yaml"
    path.write_text("modalities:\n  ncct:\n    window: {center: 40, width: 0}\n")
    result = CliRunner().invoke(main, ["train", "--stage", "ncct", "--data", str(tmp_path), "--config", str(path)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().splitlines() == ["Error: modalities.ncct.window.width=0: must be a finite number > 0"]
