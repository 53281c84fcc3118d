"""Config: profiles, validation, overrides and round-trips."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st
from metabolic.core.config import StudyConfig, apply_overrides, from_dict, parse_override_strings
from metabolic.core.errors import ConfigError
from metabolic.core.profiles import PROFILES, load_config


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_every_profile_resolves_and_round_trips(profile):
    cfg = load_config(profile)
    assert cfg.profile == profile
    assert from_dict(cfg.to_dict()) == cfg


def test_paper_profile_carries_section_vb():
    cfg = load_config("paper")
    t = cfg.train
    assert (t.K, t.budgets, t.lr, t.mu, t.epochs, t.lambda_max) == (3, (5.24, 7.48, 9.73), 8e-6, 0.15, 15, 100.0)
    assert (t.grad_clip, t.repetition_penalty, t.entropy_reg, t.vocab_aux_weight, t.weight_decay) == (1.0, 0.5, 0.025, 0.5, 0.01)
    assert t.cost_lr_multiplier > 1
    assert cfg.corpus.seq_len == 256 and cfg.csc.max_sequences == 20000
    assert cfg.generation.budgets == (1.1, 1.38, 1.65)
    assert cfg.generation.prompts == ("The future of artificial intelligence",)
    assert cfg.backbone.source == "gpt2"
    assert cfg.assets.encoder == "sentence-transformers/all-MiniLM-L6-v2"


def test_config_is_frozen():
    cfg = load_config("smoke")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.epochs = 3  # type: ignore[misc]


def test_cli_strings_are_coerced_to_field_types():
    cfg = load_config("smoke", parse_override_strings(
        ["train.epochs=7", "train.lr=3e-4", "train.budgets=(1.0, 2.0, 3.0)", "corpus.max_train_texts=None",
         "train.per_layer_budget=true", "generation.prompts=Hello there", "train.variant=faithful"]
    ))
    assert cfg.train.epochs == 7 and cfg.train.lr == 3e-4 and cfg.train.budgets == (1.0, 2.0, 3.0)
    assert cfg.corpus.max_train_texts is None and cfg.train.per_layer_budget is True
    assert cfg.generation.prompts == ("Hello there",) and cfg.train.variant == "faithful"


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"train.epochs": "x"}, "train.epochs='x' has the wrong type: expected int"),
        ({"train.epochs": 2.5}, "expected int"),
        ({"train.epochs": True}, "expected int"),
        ({"train.lr": "fast"}, "expected float"),
        ({"train.foo": 1}, "unknown override key 'train.foo'"),
        ({"nosection.foo": 1}, "unknown override key 'nosection.foo'"),
        ({"epochs": 1}, "unknown override key 'epochs'"),
        ({"train.variant": "magic"}, "choose one of 'faithful', 'expected-cost'"),
        ({"corpus.seq_len": 0}, "corpus.seq_len=0 is invalid"),
        ({"train.budgets": (1.0, -2.0, 3.0)}, "finite number > 0"),
        ({"train.budgets": (1.0, float("nan"), 3.0)}, "train.budgets=(1.0, nan, 3.0) is invalid: use a finite number"),
        ({"train.budgets": (1.0, 2.0)}, "give K=3 budgets"),
        ({"prior.c_min": 1.5}, "prior.c_min=1.5 is invalid"),
        ({"backbone.n_embd": 129}, "divisible by backbone.n_head"),
        ({"profile": "gpu"}, "cannot be overridden"),
    ],
)
def test_bad_overrides_name_the_value_and_the_fix(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config("smoke", overrides)
    text = str(info.value)
    assert message in text
    assert "\n" not in text


@pytest.mark.parametrize(
    "old, value, message",
    [
        ("energy.calibrate", "false", "energy.calibrate was renamed energy.joule_fit: use energy.joule_fit=false"),
        ("energy.calibrate", False, "energy.calibrate was renamed energy.joule_fit: use energy.joule_fit=false"),
        ("energy.calib_model", "tiny", "energy.calib_model was renamed energy.joule_fit_model: use energy.joule_fit_model=tiny"),
        ("energy.calib_requests", 8, "energy.calib_requests was renamed energy.joule_fit_requests: "
                                     "use energy.joule_fit_requests=8"),
    ],
)
def test_renamed_override_keys_name_the_new_key(old, value, message):
    """The joule fit's keys once said "calibration", which in this study is the proxy <-> CSC map alone."""
    with pytest.raises(ConfigError) as info:
        load_config("smoke", {old: value})
    assert str(info.value) == message


def test_a_saved_config_reads_renamed_keys_under_their_new_names():
    saved = load_config("smoke").to_dict()
    energy = {k: v for k, v in saved["energy"].items() if k not in ("joule_fit", "joule_fit_model", "joule_fit_requests")}
    saved["energy"] = {**energy, "calibrate": False, "calib_model": "gpu-6x384", "calib_requests": 5}
    e = from_dict(saved).energy
    assert (e.joule_fit, e.joule_fit_model, e.joule_fit_requests) == (False, "gpu-6x384", 5)


def test_unknown_profile():
    with pytest.raises(ConfigError) as info:
        load_config("nope")
    assert str(info.value) == "unknown profile 'nope': choose one of smoke, gpu, paper, cpu"


def test_override_strings_need_an_equals_sign():
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override_strings(["train.epochs"])


@given(st.integers(min_value=2, max_value=10_000))
def test_int_overrides_round_trip_through_strings(n):
    cfg = apply_overrides(StudyConfig(), {"train.epochs": str(n), "corpus.seq_len": n})
    assert cfg.train.epochs == n and cfg.corpus.seq_len == n


@given(st.lists(st.floats(min_value=1e-3, max_value=1e3, allow_nan=False), min_size=3, max_size=3))
def test_budget_tuples_round_trip(budgets):
    cfg = apply_overrides(StudyConfig(), {"train.budgets": str(tuple(budgets))})
    assert cfg.train.budgets == pytest.approx(tuple(budgets), rel=1e-12)


FLOAT_KEYS = [
    f"{section}.{f.name}"
    for section in ("backbone", "prior", "csc", "train", "generation", "energy")
    for f in dataclasses.fields(getattr(StudyConfig(), section))
    if f.type in ("float", "Optional[float]", "float | None")
]


def test_every_float_key_is_covered():
    assert {"train.mu", "train.lambda_max", "train.lr", "generation.temperature", "prior.alpha", "backbone.lr"} <= set(FLOAT_KEYS)


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e999", float("inf"), float("nan")])
def test_non_finite_values_are_rejected_with_the_key(key, value):
    with pytest.raises(ConfigError, match=rf"^{key.replace('.', '[.]')}=.* is invalid: use a finite number$"):
        load_config("smoke", {key: value})


def test_non_finite_entries_of_float_tuples_are_rejected():
    with pytest.raises(ConfigError, match=r"^generation\.budgets=.* is invalid"):
        load_config("smoke", {"generation.budgets": [1.0, float("inf")]})
