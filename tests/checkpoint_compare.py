"""Test helpers: the final checkpoint of a run (without RNG state) and a bitwise comparison of weight dicts."""
import torch

from proxrl.runs import latest_checkpoint, load_checkpoint


def final_tensors(run_dir):
    """(tensors without ``rng.*``, state) of the run's newest checkpoint."""
    tensors, state = load_checkpoint(latest_checkpoint(run_dir))
    return {k: v for k, v in tensors.items() if not k.startswith("rng.")}, state


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"
