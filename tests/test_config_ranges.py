"""Every numeric config key has its valid range, and every named key its names, in the one schema
(``timm_exits.config.VALID``): a value outside them is an error naming the key before anything runs,
never a run with a plausible-looking wrong result."""
import math
from pathlib import Path

import pytest

from timm_exits.config import DEFAULTS, VALID, ConfigError, load_config, phase_configs, resolve_config

ROOT = Path(__file__).resolve().parents[1]
BASE = dict(model=dict(name="msdnet_cifar_5exit"))


def _with(key: str, value):
    """A config dict setting the dotted ``key`` to ``value``."""
    config, node = {**BASE}, None
    *sections, leaf = key.split(".")
    node = config
    for section in sections:
        node = node.setdefault(section, {})
    node[leaf] = value
    return config


def _leaves(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict) and value and f"{prefix}{key}" not in ("model.kwargs",):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def test_every_numeric_default_has_its_range_in_the_schema():
    numeric = [key for key, value in _leaves(DEFAULTS)
               if isinstance(value, (int, float)) and not isinstance(value, bool)]
    assert numeric and [key for key in numeric if key not in VALID] == []
    for key in VALID:  # and every range admits its own default
        value = dict(_leaves(DEFAULTS)).get(key)
        assert VALID[key].admits(value), (key, value)


@pytest.mark.parametrize("key, value, message", [
    ("train.clip_grad", -1, r"train.clip_grad must be a number > 0.0 or None, got -1"),
    ("train.clip_grad", 0, r"train.clip_grad must be a number > 0.0 or None, got 0"),
    ("train.ema_decay", 2.0, r"train.ema_decay must be a number > 0.0 and < 1.0 or None, got 2.0"),
    ("train.ema_decay", -1, r"train.ema_decay must be .*, got -1"),
    ("train.ema_decay", math.nan, r"train.ema_decay must be .*, got nan"),
    ("optimizer.momentum", 2.0, r"optimizer.momentum must be a number >= 0.0 and < 1.0, got 2.0"),
    ("optimizer.lr", -0.1, r"optimizer.lr must be a number > 0.0 or None"),
    ("optimizer.weight_decay", math.inf, r"optimizer.weight_decay must be a number >= 0.0, got inf"),
    ("train.seed", -1, r"train.seed must be an integer >= 0"),
    ("mixup.prob", 1.5, r"mixup.prob must be a number >= 0.0 and <= 1.0"),
    ("evaluation.q_grid", "IMTA", r"evaluation.q_grid must be 'reference' or 'imta', got 'IMTA'"),
    ("evaluation.policy", "max_prob", r"evaluation.policy must be 'maxprob', 'entropy', 'margin', 'patience' or 'gate'"),
    ("evaluation.convention", "flops", r"evaluation.convention must be 'macs', 'msdnet' or 'macs_norm'"),
    ("data.img_mode", "evil", r"data.img_mode must be 'RGB' or 'L', got 'evil'"),
    ("data.transform", "pad-crop", r"data.transform must be 'timm' or 'pad_crop'"),
    ("data.interpolation", "cubic", r"data.interpolation must be None, 'bilinear', .*, got 'cubic'"),
    ("data.crop_pct", 0, r"data.crop_pct must be a number > 0.0 and <= 1.0 or None, got 0"),
    ("data.mean", [math.nan], r"data.mean must be a list of finite numbers or None, got \[nan\]"),
    ("data.std", [0.5, 0, 0.5], r"data.std must be a list of numbers > 0.0 or None, got \[0.5, 0, 0.5\]"),
    ("data.std", [-0.5], r"data.std must be a list of numbers > 0.0 or None"),
    ("data.input_size", [3, 32], r"data.input_size must be 3 integers >= 1 or None, got \[3, 32\]"),
])
def test_a_value_outside_its_range_or_names_is_refused_naming_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config(_with(key, value))


@pytest.mark.parametrize("technique, message", [
    (dict(type="OneForAll", gamma=1.5), r"OneForAll option gamma must be a number >= 0.0 and <= 1.0, got 1.5"),
    (dict(type="OneForAll", temperature=0), r"OneForAll option temperature must be a number > 0.0, got 0"),
    (dict(type="HDKD", lr=-3e-4), r"HDKD option lr must be a number > 0.0, got -0.0003"),
    (dict(type="HDKD", xi=math.nan), r"HDKD option xi must be a number > 0.0 or None, got nan"),
    (dict(type="L2W", hidden_size=0), r"L2W option hidden_size must be an integer >= 1, got 0"),
    (dict(type="BoostNet", reweight=[0.5, -1]), r"BoostNet option reweight must be a number >= 0.0, or a list of them"),
    (dict(type="CrossEntropy", label_smoothing=1.0), r"CrossEntropy option label_smoothing must be a number >= 0.0 "
                                                     r"and < 1.0, got 1.0"),
])
def test_a_technique_option_outside_its_range_is_refused_naming_the_type_and_option(technique, message):
    with pytest.raises(ConfigError, match="technique: " + message):
        resolve_config(dict(BASE, technique=technique))


def test_mean_and_std_counts_follow_the_channels():
    one = resolve_config(_with("data.input_size", (1, 32, 32)))
    assert one["data"]["input_size"] == (1, 32, 32)
    config = _with("data.input_size", (3, 32, 32))
    config["data"].update(mean=(0.5, 0.5), std=(0.25,))
    with pytest.raises(ConfigError, match=r"data.mean has 2 values for 3-channel input: give 3 \(one per channel\) "
                                          r"or 1 \(for every channel\)"):
        resolve_config(config)


def test_negative_exit_weights_are_refused():
    config = _with("technique.exit_weights", [1, -1, 1, 1, 1])
    with pytest.raises(ConfigError, match=r"technique: CrossEntropy option exit_weights must be finite and >= 0"):
        resolve_config(config)


def test_a_phase_is_checked_against_the_same_schema():
    config = resolve_config(dict(BASE, phases=[dict(name="a"), dict(name="b", train=dict(ema_decay=2.0))]))
    with pytest.raises(ConfigError, match=r"phase 'b': train.ema_decay must be a number > 0.0 and < 1.0"):
        phase_configs(config)


def test_cfg_options_are_checked_too():
    with pytest.raises(ConfigError, match=r"train.clip_grad must be a number > 0.0 or None, got -1"):
        load_config(str(ROOT / "recipes" / "cifar.py"), cfg_options={"train.clip_grad": -1})
