"""proxrl.config: dataclass <-> flags/YAML, one-line errors for unknown keys and bad values."""
import argparse
from dataclasses import dataclass
from typing import Literal, Optional

import pytest

from proxrl import config as C
from proxrl.errors import UserError


@dataclass
class Toy:
    learning_rate: float = C.opt(3e-4, "step size")
    epochs: int = C.opt(4, "passes over a rollout")
    target_kl: Optional[float] = C.opt(None, "early-stop threshold")
    norm_adv: bool = C.opt(True, "normalise advantages")
    mode: Literal["a", "b"] = C.opt("a", "a mode")

    def __post_init__(self):
        C.check(self.learning_rate > 0, f"--learning-rate must be > 0, got {self.learning_rate}")


def parse(argv, base=None):
    p = argparse.ArgumentParser()
    p.add_argument("--config")
    C.add_dataclass_args(p, Toy)
    return C.build(Toy, p.parse_args(argv), base=base)


def test_flags_override_base_and_types_are_converted():
    cfg = parse(["--learning-rate", "1e-3", "--target-kl", "0.02", "--norm-adv", "false", "--mode", "b"],
                base={"epochs": 10, "learning_rate": 5.0})
    assert cfg == Toy(learning_rate=1e-3, epochs=10, target_kl=0.02, norm_adv=False, mode="b")


def test_optional_none_and_defaults():
    cfg = parse(["--target-kl", "none"])
    assert cfg.target_kl is None and cfg.epochs == 4


def test_yaml_then_flags(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("learning-rate: 0.01\nepochs: 7\n")
    assert parse(["--config", str(f), "--epochs", "2"]) == Toy(learning_rate=0.01, epochs=2)


def test_unknown_yaml_key_is_named_with_suggestion(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("learning_rat: 0.01\n")
    with pytest.raises(UserError, match=r"unknown key 'learning_rat'.*did you mean 'learning_rate'"):
        parse(["--config", str(f)])


def test_bad_yaml_value_and_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("epochs: 2.5\n")
    with pytest.raises(UserError, match=r"'epochs' = 2.5 is not a valid int"):
        parse(["--config", str(f)])
    with pytest.raises(UserError, match="does not exist"):
        parse(["--config", str(tmp_path / "missing.yaml")])
    g = tmp_path / "bad.yaml"
    g.write_text("a: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        parse(["--config", str(g)])


def test_validation_in_post_init():
    with pytest.raises(UserError, match="--learning-rate must be > 0, got -1.0"):
        parse(["--learning-rate", "-1"])


def test_bad_flag_value_exits_2():
    with pytest.raises(SystemExit) as e:
        parse(["--epochs", "many"])
    assert e.value.code == 2


@dataclass
class Resumable:
    learning_rate: float = C.opt(3e-4, "step size")
    total_steps: int = C.opt(100, "budget")
    value_clip_coef: Optional[float] = C.opt(None, "value clip")

    renamed_fields = {"clip_value_coef": "value_clip_coef"}
    resumable_fields = frozenset({"total_steps"})


def test_renamed_option_names_the_new_one():
    with pytest.raises(UserError, match="'clip_value_coef' was renamed to 'value_clip_coef'"):
        C.from_dict(Resumable, {"clip_value_coef": 0.2}, source="my.yaml")
    assert C.from_dict(Resumable, {"value_clip_coef": 0.2}).value_clip_coef == 0.2


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "NaN"])
def test_non_finite_floats_refused_from_flags_and_files(text):
    p = argparse.ArgumentParser()
    C.add_dataclass_args(p, Resumable)
    p.error = lambda msg: (_ for _ in ()).throw(UserError(msg))  # type: ignore[method-assign]
    with pytest.raises(UserError, match="finite"):
        p.parse_args([f"--learning-rate={text}"])
    with pytest.raises(UserError, match="learning_rate.*finite"):
        C.from_dict(Resumable, {"learning_rate": float(text)})


def test_resume_config_applies_resumable_and_rejects_others():
    saved = {"learning_rate": 1e-3, "total_steps": 100}
    cfg = C.resume_config(Resumable, saved, {"total_steps": 500})
    assert (cfg.learning_rate, cfg.total_steps) == (1e-3, 500)
    assert C.resume_config(Resumable, saved, {"learning_rate": 1e-3}).learning_rate == 1e-3  # same value: fine
    with pytest.raises(UserError, match=r"--learning-rate cannot change on --resume .*learning_rate=0.001.*--total-steps"):
        C.resume_config(Resumable, saved, {"learning_rate": 5.0})


def test_binary_config_file_is_one_line_error(tmp_path):
    f = tmp_path / "bin.yaml"
    f.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(UserError, match="not a UTF-8 text file"):
        C.load_yaml(f)


def test_run_info_section_of_a_run_config_is_not_an_option(tmp_path):
    f = tmp_path / "config.yaml"
    f.write_text("learning_rate: 0.01\nrun_info:\n  device: cpu\n  processes: 2\n")
    p = argparse.ArgumentParser()
    p.add_argument("--config")
    C.add_dataclass_args(p, Toy)
    assert C.build(Toy, p.parse_args(["--config", str(f)])).learning_rate == 0.01
    assert C.from_dict(Toy, {"run_info": {"device": "cpu"}, "epochs": 2}).epochs == 2
