"""Config layering and --seed parsing (the labelled share, not the random seed)."""

import pytest

from selfie_lite.config import diff_configs, load_config, parse_override, to_dict
from selfie_lite.errors import UserError
from selfie_lite.validate import parse_labelled_share


@pytest.mark.parametrize(
    "text,n_rows,expected",
    [("3.3pct", 6000, 198), ("3.3%", 6000, 198), ("3.3 PCT", 60000, 1980), ("100%", 50, 50), ("2000", 60000, 2000),
     ("0.01pct", 100, 1)],
)
def test_parse_labelled_share_counts(text, n_rows, expected):
    assert parse_labelled_share(text, n_rows) == expected


def test_parse_labelled_share_without_rows_keeps_the_kind():
    assert parse_labelled_share("3.3pct") == pytest.approx(0.033)
    assert parse_labelled_share("2000") == 2000


@pytest.mark.parametrize(
    "text,n_rows,fragment",
    [("0", None, "at least one"), ("0pct", None, "above 0%"), ("101%", None, "at most 100%"), ("abc", None, "not a labelled share"),
     ("-5", None, "not a labelled share"), ("3.3", None, "not a labelled share"), ("7000", 6000, "has 6000 valid rows")],
)
def test_parse_labelled_share_rejects(text, n_rows, fragment):
    with pytest.raises(UserError, match=fragment):
        parse_labelled_share(text, n_rows)


def test_defaults_are_the_papers():
    cfg = load_config()
    assert cfg.beta == 0.1 and cfg.rounds == 3
    assert cfg.sample.num_samples == 2 and cfg.sample.temperature == 0.7 and cfg.sample.top_p == 1.0
    assert cfg.sample.max_new_tokens == 300
    assert cfg.refine.alpha == 0.1 and cfg.refine.low_conf_frac == 0.1 and cfg.refine.warmup_frac == 0.2
    assert cfg.refine.lambdas == [0.5, 0.25, 0.125]
    assert cfg.data.pool_ratio == [8.0, 20.0, 30.0] and cfg.data.labelled_share == "3.3pct"
    assert cfg.train.seed_epochs == 3 and cfg.train.round_epochs == 1


def test_layers_preset_then_file_then_flags(tmp_path):
    f = tmp_path / "my.toml"
    f.write_text("beta = 0.05\n[train]\nlearning_rate = 1e-4\nbatch_size = 4\n")
    cfg = load_config("tiny", f, [parse_override("train.batch_size=2"), parse_override("data.labelled_share='5%'")])
    assert cfg.beta == 0.05  # file over default
    assert cfg.train.learning_rate == 1e-4  # file over preset (tiny sets 1e-3)
    assert cfg.train.batch_size == 2  # flag over file
    assert cfg.data.pool_sizes == [400, 1000, 1500]  # from the preset
    assert cfg.data.labelled_share == "5%"


def test_unknown_key_is_named(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("[train]\nlearning_rat = 1e-4\n")
    with pytest.raises(UserError, match="unknown config key train.learning_rat") as e:
        load_config(None, f)
    assert "learning_rate" in e.value.hint


def test_wrong_type_is_named(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("rounds = 'three'\n")
    with pytest.raises(UserError, match="config key rounds: expected int"):
        load_config(None, f)


def test_ints_are_accepted_for_floats_but_bools_are_not_ints():
    assert load_config(None, None, [parse_override("beta=1")]).beta == 1.0
    with pytest.raises(UserError, match="expected int"):
        load_config(None, None, [parse_override("rounds=true")])


def test_cross_field_checks():
    with pytest.raises(UserError, match="3 rounds need 3 prompt pools"):
        load_config(None, None, [{"data": {"pool_sizes": [10, 20]}}])
    with pytest.raises(UserError, match="num_samples must be at least 2"):
        load_config(None, None, [{"sample": {"num_samples": 1}}])
    with pytest.raises(UserError, match="no preset named"):
        load_config("nope")


def test_override_parsing():
    assert parse_override("train.learning_rate=1e-5") == {"train": {"learning_rate": 1e-5}}
    assert parse_override("model=some/model") == {"model": "some/model"}  # not TOML: kept as a string
    assert parse_override("refine.lambdas=[0, 0, 0]") == {"refine": {"lambdas": [0, 0, 0]}}
    with pytest.raises(UserError, match="KEY=VALUE"):
        parse_override("beta")


def test_diff_names_changed_keys():
    a, b = to_dict(load_config()), to_dict(load_config(None, None, [parse_override("train.batch_size=3")]))
    assert diff_configs(a, b) == ["train.batch_size: 8 -> 3"]


def _numeric_keys(cls, prefix=""):
    """Dotted keys of every int/float field (and list of ints/floats) of cls and its nested dataclasses."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _numeric_keys(tp, f"{prefix}{f.name}.")
        elif tp in (int, float) or (typing.get_origin(tp) is list and typing.get_args(tp)[0] in (int, float)):
            yield prefix + f.name


def test_every_numeric_setting_has_a_range():
    """A new int/float knob cannot be added without its valid range in config.RANGES (and no stale entries)."""
    from selfie_lite.config import RunConfig
    from selfie_lite.validate import RANGES

    keys = set(_numeric_keys(RunConfig))
    assert "sample.chunk_size" in keys and "refine.lambdas" in keys and "lora.alpha" in keys
    assert keys - set(RANGES) == set(), "numeric settings without a range entry"
    assert set(RANGES) - keys == set(), "range entries for settings that do not exist"


def test_defaults_and_presets_are_in_range():
    from selfie_lite.config import PACKAGED_PRESETS

    load_config()
    for p in PACKAGED_PRESETS.glob("*.toml"):
        load_config(p.stem)


@pytest.mark.parametrize(
    "override,message",
    [("sample.chunk_size=0", "sample.chunk_size must be >= 1, got 0"),
     ("train.warmup_ratio=1", "train.warmup_ratio must be in [0, 1), got 1.0"),
     ("refine.lambdas=[0.5, -1, 0.1]", "refine.lambdas[1] must be >= 0, got -1.0"),
     ("beta=nan", "beta must be > 0, got nan"),
     ("lora.dropout=1", "lora.dropout must be in [0, 1), got 1.0"),
     ("guard.min_anchor_agreement=1.5", "guard.min_anchor_agreement must be in [0, 1], got 1.5"),
     ("threads=-1", "threads must be in [0, 1024], got -1")],
)
def test_ranges_name_the_key_and_the_value(override, message):
    with pytest.raises(UserError) as e:
        load_config(None, None, [parse_override(override)])
    assert str(e.value) == message


def test_method_paper_is_the_papers_loop_exactly(tmp_path):
    from selfie_lite.config import GuardConfig, RobustConfig, load_config

    default = load_config("tiny")
    assert default.method == "selfie" and default.guard.select == "guard"  # our default: the round guard on
    paper = load_config("tiny", None, [{"method": "paper"}])
    assert paper.guard.select == "last" and paper.robust == RobustConfig(0.0, 1.0, False, "previous", "off")
    assert paper.guard.min_anchor_agreement == GuardConfig().min_anchor_agreement
    assert (paper.train, paper.refine, paper.beta) == (default.train, default.refine, default.beta)
    with pytest.raises(UserError, match="method must be"):
        load_config("tiny", None, [{"method": "fast"}])


def test_the_labelled_share_is_not_called_seed_in_the_config():
    from selfie_lite.config import from_dict

    cfg = from_dict({"data": {"labelled_share": "48"}, "random_seed": 7})
    assert cfg.data.labelled_share == "48" and cfg.random_seed == 7
    with pytest.raises(UserError, match="unknown config key data.seed"):
        from_dict({"data": {"seed": "48"}})
