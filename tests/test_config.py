from pathlib import Path

import pytest

from dpokit.cli import _config
from dpokit.config import ConfigError, RunConfig, load_config, save_config
from dpokit.losses import LOSSES, LossSpec, sigmoid_loss

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_shipped_configs_exist() -> None:
    assert len(CONFIGS) >= 2


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    command = "sft" if "sft" in path.name else "dpo"
    config = _config(str(path), [], command)
    assert isinstance(config, RunConfig)
    assert config.data.train_path


def test_unknown_key_suggests_the_nearest(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'train.learning_rate'"):
        load_config(f)
    with pytest.raises(ConfigError, match=r"did you mean 'beta'"):
        load_config(None, ["loss.betta=0.2"])
    with pytest.raises(ConfigError, match=r"did you mean 'train'"):
        load_config(None, ["trian.lr=1"])


def test_wrong_types_and_choices_are_named() -> None:
    with pytest.raises(ConfigError, match=r"train.batch_size: expected int, got str"):
        load_config(None, ["train.batch_size=abc"])
    with pytest.raises(ConfigError, match=r"loss.name: 'sigmod' is not one of.*did you mean 'sigmoid'"):
        load_config(None, ["loss.name=sigmod"])
    with pytest.raises(ConfigError, match=r"expected int, got bool"):
        load_config(None, ["train.seed=true"])


def test_overrides_and_int_for_float() -> None:
    config = load_config(None, ["loss.beta=1", "train.lr=3e-4", "data.max_examples=null", "train.max_grad_norm=null"])
    assert config.loss.beta == 1.0 and isinstance(config.loss.beta, float)
    assert config.train.lr == pytest.approx(3e-4)
    assert config.train.max_grad_norm is None


def test_contradictory_settings_fail_before_anything_runs() -> None:
    with pytest.raises(ConfigError, match="max_prompt_length"):
        load_config(None, ["data.max_length=64", "data.max_prompt_length=64"])
    with pytest.raises(ConfigError, match="multiple of train.micro_batch_size"):
        load_config(None, ["train.batch_size=10", "train.micro_batch_size=4"])
    with pytest.raises(ConfigError, match="reference.cache"):
        load_config(None, ["reference.mode=precomputed"])
    with pytest.raises(ConfigError, match="label_smoothing applies"):
        load_config(None, ["loss.name=ipo", "loss.label_smoothing=0.1"])
    with pytest.raises(ConfigError, match="reference-free"):
        load_config(None, ["loss.name=ipo", "reference.mode=none"])
    with pytest.raises(ConfigError, match="train.compile=true only"):
        load_config(None, ["train.compile_memory_budget=0.5"])
    with pytest.raises(ConfigError, match=r"\(0, 1\]"):
        load_config(None, ["train.compile=true", "train.compile_memory_budget=0"])


def test_sft_command_sets_loss_and_refuses_a_contradiction(tmp_path: Path) -> None:
    config = _config(None, [], "sft")
    assert config.loss.name == "sft" and config.reference.mode == "none"
    f = tmp_path / "c.yaml"
    f.write_text("loss:\n  name: ipo\n")
    with pytest.raises(ConfigError, match="loss.name=sft"):
        _config(str(f), [], "sft")


def test_saved_config_round_trips(tmp_path: Path) -> None:
    config = load_config(None, ["loss.beta=0.5", "data.train_path=x.jsonl", "train.max_steps=3"])
    save_config(config, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == config


def test_loss_rules_read_the_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Which losses run reference-free, which read a hyper-parameter and which names exist all come from
    `dpokit.losses.LOSSES`, messages included."""
    free = ", ".join(name for name, spec in LOSSES.items() if spec.reference != "required")
    assert free.startswith("sigmoid, unlikelihood, sft")
    with pytest.raises(ConfigError, match=rf"reference-free\) is defined for loss.name={free} only"):
        load_config(None, ["loss.name=ipo", "reference.mode=none"])
    with pytest.raises(ConfigError, match="loss.nll_alpha applies to loss.name=dpo_nll only, not sigmoid"):
        load_config(None, ["loss.nll_alpha=0.5"])
    assert load_config(None, ["loss.name=unlikelihood", "loss.unlikelihood_alpha=0.1"]).loss.unlikelihood_alpha == 0.1
    with pytest.raises(ConfigError, match="loss.name: 'toy' is not one of"):
        load_config(None, ["loss.name=toy"])
    monkeypatch.setitem(LOSSES, "toy", LossSpec(sigmoid_loss, "pairs", "optional", {"beta": "beta"}))
    assert load_config(None, ["loss.name=toy", "reference.mode=none"]).loss.name == "toy"
    with pytest.raises(ConfigError, match="label_smoothing applies to loss.name=sigmoid only"):
        load_config(None, ["loss.name=toy", "loss.label_smoothing=0.1"])
    monkeypatch.setitem(LOSSES, "toy", LossSpec(sigmoid_loss, "pairs", "unused"))
    with pytest.raises(ConfigError, match="loss.name=toy trains without a reference"):
        load_config(None, ["loss.name=toy"])


def test_every_number_in_the_schema_has_a_range() -> None:
    import dataclasses
    import typing

    from dpokit.config_checks import BOUNDS

    def numbers(cls: type, where: str) -> set[str]:
        found = set()
        for name, hint in typing.get_type_hints(cls).items():
            kinds = {hint, *typing.get_args(hint)}
            if {int, float} & kinds:
                found.add(f"{where}{name}")
            for kind in kinds:
                if dataclasses.is_dataclass(kind):  # a section, or an optional one such as model.lora
                    found |= numbers(kind, f"{where}{name}.")
        return found

    assert numbers(RunConfig, "") == set(BOUNDS)


def test_values_at_the_edge_of_their_range_are_accepted() -> None:
    edge = [
        "loss.label_smoothing=0.49",
        "data.eval_fraction=0",
        "train.max_grad_norm=null",
        "train.seed=9223372036854775807",
        "train.max_steps=1",
        "train.warmup_steps=0",
        "train.weight_decay=0",
        "train.compile=true",
        "train.compile_memory_budget=1",
        "data.max_length=2",
        "data.max_prompt_length=1",
    ]
    config = load_config(None, edge)
    assert config.train.seed == 2**63 - 1 and config.data.max_length == 2
    assert load_config(None, ["loss.name=dpo_nll", "loss.nll_alpha=0"]).loss.nll_alpha == 0


def test_yaml_merge_keys_may_override_but_plain_duplicates_may_not(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  <<: {lr: 0.1, epochs: 2}\n  lr: 0.2\n")
    assert load_config(f).train.lr == 0.2
    f.write_text("train:\n  lr: 0.1\n  epochs: 2\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match=r"line 4: key 'lr' is given twice \(first on line 2\)"):
        load_config(f)
