"""Checkpoint integrity (issue 10 item 3): sha256 of both files in state.json, verified on load; a corrupt newest
checkpoint is named with the file, and --resume is offered the previous good one; missing keys/tensors are one line."""
from __future__ import annotations

import json
import math

import pytest
import torch

from proxrl.errors import UserError
from proxrl.runs import (
    CheckpointError,
    check_tensor_shapes,
    checkpoint_dir,
    latest_checkpoint,
    load_checkpoint,
    load_latest_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)


def _save(run, step, value=1.0, state=None):
    w = torch.full((16, 16), float(value))
    return save_checkpoint(checkpoint_dir(run, step), {"w": w, "b": torch.zeros(4)},
                           state if state is not None else {"step": step, "counters": {"global_step": step * 10}})


def _flip_tensor_byte(directory, name="w"):
    """Flip one byte inside tensor ``name``'s data (the file still parses: only the checksum can tell)."""
    path = directory / "model.safetensors"
    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    start, _ = json.loads(data[8:8 + header_len])[name]["data_offsets"]
    data[8 + header_len + start + 5] ^= 0x40
    path.write_bytes(bytes(data))


def _one_line(e):
    assert "\n" not in str(e.value)
    return str(e.value)


def test_flipped_weight_bytes_are_refused_naming_directory_and_file(tmp_path):
    d = _save(tmp_path, 3)
    _flip_tensor_byte(d)
    with pytest.raises(UserError) as e:
        load_checkpoint(d)
    msg = _one_line(e)
    assert str(d) in msg and "model.safetensors" in msg and "sha256" in msg
    assert isinstance(e.value, CheckpointError) and e.value.file == "model.safetensors" and e.value.directory == d
    with pytest.raises(CheckpointError):
        verify_checkpoint(d)
    tensors, _ = load_checkpoint(d, verify=False)  # the bytes still parse: before checksums this loaded silently
    assert not torch.equal(tensors["w"], torch.full((16, 16), 1.0))


def test_edited_state_value_is_refused_naming_state_json(tmp_path):
    d = _save(tmp_path, 3)
    p = d / "state.json"
    p.write_text(p.read_text().replace('"global_step": 30', '"global_step": 31'))  # valid JSON, wrong value
    with pytest.raises(CheckpointError, match=r"state\.json") as e:
        load_checkpoint(d)
    assert str(d) in _one_line(e)


def test_nan_weights_are_not_a_checksum_problem_and_state_roundtrips(tmp_path):
    state = {"step": 1, "x": float("nan"), "big": 2**70, "t": (1, 2), "k": {"3": -0.0}}
    d = save_checkpoint(tmp_path / "ck", {"w": torch.tensor([math.nan, 1.0])}, state)
    tensors, loaded = load_checkpoint(d)
    assert math.isnan(tensors["w"][0]) and math.isnan(loaded["x"])
    assert "_checksums" not in loaded and loaded["t"] == [1, 2] and loaded["big"] == 2**70
    raw = json.loads((d / "state.json").read_text())
    assert set(raw["_checksums"]) == {"model.safetensors", "state.json"}
    assert raw["_checksums"]["model.safetensors"].startswith("sha256:")
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path / "ck2", {}, {"_checksums": 1})


def test_checkpoint_without_checksums_still_loads(tmp_path):
    d = _save(tmp_path, 2)
    _flip_tensor_byte(d)  # an old checkpoint cannot be verified ...
    p = d / "state.json"
    state = json.loads(p.read_text())
    del state["_checksums"]
    p.write_text(json.dumps(state))
    tensors, loaded = load_checkpoint(d)  # ... so it loads as before
    assert loaded == {"step": 2, "counters": {"global_step": 20}} and tensors["w"].shape == (16, 16)
    verify_checkpoint(d)
    assert latest_checkpoint(tmp_path, verify=True) == d


def test_required_state_keys_and_tensors_are_one_line(tmp_path):
    d = _save(tmp_path, 2)
    load_checkpoint(d, require_state=["step", "counters.global_step"], require_tensors=["w", "b"])
    with pytest.raises(CheckpointError, match=r"lacks 'counters\.env_epoch' in state\.json") as e:
        load_checkpoint(d, require_state=["counters.env_epoch"])
    assert str(d) in _one_line(e)
    with pytest.raises(CheckpointError, match=r"lacks tensor 'policy\.0\.weight' in model\.safetensors") as e:
        load_checkpoint(d, require_tensors=["w", "policy.0.weight"])
    _one_line(e)
    (d / "state.json").write_text("{}")  # an emptied state: no checksums, so only the required keys can tell
    with pytest.raises(CheckpointError, match=r"lacks 'step' in state\.json") as e:
        load_checkpoint(d, require_state=["step"])
    _one_line(e)
    (d / "state.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="expected a JSON object"):
        load_checkpoint(d)


def test_check_tensor_shapes_names_the_tensor(tmp_path):
    d = _save(tmp_path, 1)
    tensors, _ = load_checkpoint(d)
    check_tensor_shapes(d, tensors, {"w": (16, 16), "b": torch.Size([4])})
    with pytest.raises(UserError, match=r"'w' has shape \[16, 16\] but the model expects \[32, 16\]; hidden") as e:
        check_tensor_shapes(d, tensors, {"w": (32, 16)}, fix="hidden_sizes changed")
    _one_line(e)
    with pytest.raises(UserError, match="no tensor 'v'"):
        check_tensor_shapes(d, tensors, {"v": (1,)})


def test_resume_names_the_corrupt_checkpoint_and_offers_the_previous_good_one(tmp_path):
    assert load_latest_checkpoint(tmp_path) is None
    for step in (4, 8, 12):
        _save(tmp_path, step, value=step)
    path, tensors, state = load_latest_checkpoint(tmp_path, require_state=["step"])
    assert path == checkpoint_dir(tmp_path, 12) and state["step"] == 12 and tensors["w"][0, 0] == 12
    _flip_tensor_byte(checkpoint_dir(tmp_path, 12))
    _flip_tensor_byte(checkpoint_dir(tmp_path, 8), name="b")
    with pytest.raises(UserError) as e:
        load_latest_checkpoint(tmp_path)
    msg = _one_line(e)
    assert msg == (f"checkpoint {checkpoint_dir(tmp_path, 12)} is corrupt or incomplete (model.safetensors fails its "
                   f"sha256 check); the previous good one is step_000000004: delete {checkpoint_dir(tmp_path, 12)} "
                   f"to resume from it")
    assert latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 12)
    assert latest_checkpoint(tmp_path, verify=True) == checkpoint_dir(tmp_path, 4)
    for step in (12, 8):  # the user follows the advice
        for f in checkpoint_dir(tmp_path, step).iterdir():
            f.unlink()
        checkpoint_dir(tmp_path, step).rmdir()
    path, _, state = load_latest_checkpoint(tmp_path)
    assert path == checkpoint_dir(tmp_path, 4) and state["step"] == 4


def test_resume_with_no_good_checkpoint_says_so(tmp_path):
    _save(tmp_path, 4, state={})
    with pytest.raises(UserError, match=r"\(state\.json lacks 'step'\) and it is the run's only checkpoint") as e:
        load_latest_checkpoint(tmp_path, require_state=["step"])
    _one_line(e)
    _save(tmp_path, 8)
    _flip_tensor_byte(checkpoint_dir(tmp_path, 8))
    with pytest.raises(UserError, match="no earlier checkpoint is usable either") as e:
        load_latest_checkpoint(tmp_path, require_state=["step"])
    assert str(checkpoint_dir(tmp_path, 8)) in _one_line(e)
