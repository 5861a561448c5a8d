"""TrainConfig: one place for the training settings' defaults and ranges; it checks itself."""

import dataclasses

import pytest

from lorlib_ui.core.errors import LorlibError
from lorlib_ui.training.config import TrainConfig


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"rank": 0}, "rank must be a positive integer, got 0"),
        ({"steps": -1}, "steps must be a positive integer"),
        ({"batch_size": 2.5}, "batch size must be a positive integer"),
        ({"learning_rate": 0.0}, "learning rate must be positive"),
        ({"learning_rate": float("nan")}, "learning rate must be positive"),
        ({"alpha": -2.0}, "alpha must be positive"),
        ({"targets": ()}, "target modules must be a non-empty list"),
        ({"targets": "q_proj"}, "target modules must be a non-empty list"),
        ({"seed": "zero"}, "seed must be an integer"),
    ],
)
def test_bad_settings_are_refused_where_the_config_is_made(settings, message):
    with pytest.raises(LorlibError, match=message):
        TrainConfig(**settings)


def test_from_options_coerces_json_and_ignores_other_keys():
    config = TrainConfig.from_options({"rank": "2", "targets": ["q_proj"], "steps": 3.0, "data": "x", "alpha": None})
    assert config == TrainConfig(rank=2, targets=("q_proj",), steps=3)
    assert TrainConfig.from_options({"steps": 9}, steps=4).steps == 4  # overrides win
    with pytest.raises(LorlibError, match="rank must be an integer, got 'two'"):
        TrainConfig.from_options({"rank": "two"})


def test_configs_are_changed_by_replace_not_in_place():
    config = TrainConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.bf16 = True
    assert dataclasses.replace(config, bf16=True).bf16 and not config.bf16


def test_an_override_of_none_keeps_what_the_options_say():
    """`adapt` trains with the library's recorded steps unless told otherwise."""
    recorded = {"steps": 60, "rank": 4, "targets": ["q_proj", "v_proj"], "data": "default"}
    assert TrainConfig.from_options(recorded, steps=None, seed=3).steps == 60
    assert TrainConfig.from_options(recorded, steps=7).steps == 7


def test_a_rank_past_the_cap_is_refused_before_any_training(monkeypatch):
    """The cap every stored expert obeys ($LORLIB_MAX_RANK) is checked when training is asked for."""
    from lorlib_ui.training.config import TrainConfig

    assert TrainConfig(rank=64).rank == 64
    with pytest.raises(LorlibError, match=r"rank 65 is above the largest rank allowed, 64 \(LORLIB_MAX_RANK\)"):
        TrainConfig(rank=65)
    monkeypatch.setenv("LORLIB_MAX_RANK", "8")
    with pytest.raises(LorlibError, match="above the largest rank allowed, 8"):
        TrainConfig(rank=16)
    monkeypatch.setenv("LORLIB_MAX_RANK", "zero")
    with pytest.raises(LorlibError, match="LORLIB_MAX_RANK must be a positive integer"):
        TrainConfig(rank=4)
