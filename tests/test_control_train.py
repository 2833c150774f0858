"""End-to-end training: determinism, exact resume, normaliser stats in checkpoints, evaluation, plots, learning."""
from __future__ import annotations

import shutil

import pytest
import torch

from proxrl.control import PRESETS, ControlConfig, evaluate_run, plot_run, train
from proxrl.control.checkpointing import load_agent
from proxrl.errors import UserError
from proxrl.runs import latest_checkpoint, list_checkpoints, load_checkpoint, read_metrics
from checkpoint_compare import assert_bitwise_equal, final_tensors

torch.set_num_threads(1)

TIMING_KEYS = {"steps_per_second", "train_seconds"}


def _cartpole(**kw) -> ControlConfig:
    base = {**PRESETS["CartPole-v1"], "total_steps": 1536, "eval_every": 0, "eval_episodes": 2, "tensorboard": False}
    return ControlConfig(**{**base, **kw})


def _pendulum(**kw) -> ControlConfig:
    base = {**PRESETS["Pendulum-v1"], "total_steps": 3 * 512, "rollout_steps": 128, "num_minibatches": 4, "epochs": 2,
            "eval_every": 0, "eval_episodes": 2, "tensorboard": False}
    return ControlConfig(**{**base, **kw})




def test_same_seed_gives_bitwise_identical_weights(tmp_path):
    train(_cartpole(seed=3, total_steps=768), tmp_path / "a", progress=False)
    train(_cartpole(seed=3, total_steps=768), tmp_path / "b", progress=False)
    train(_cartpole(seed=4, total_steps=768), tmp_path / "c", progress=False)
    a, b, c = (final_tensors(tmp_path / n)[0] for n in "abc")
    assert_bitwise_equal(a, b)
    assert not torch.equal(a["policy.actor.0.weight"], c["policy.actor.0.weight"])


@pytest.mark.parametrize("make_cfg", [_cartpole, _pendulum], ids=["CartPole-native", "Pendulum-sync-normalised"])
def test_resume_matches_uninterrupted_run_bitwise(tmp_path, make_cfg):
    cfg = make_cfg(checkpoint_every=512, keep_checkpoints=3)
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(cfg, full, progress=False)
    ckpts = list_checkpoints(full)
    assert len(ckpts) == 3
    shutil.copytree(full, cut)
    for extra in list_checkpoints(cut)[1:]:  # "crash" after the first checkpoint
        shutil.rmtree(extra)
    train(cfg, cut, resume=True, progress=False)
    (ta, sa), (tb, sb) = final_tensors(full), final_tensors(cut)
    assert_bitwise_equal(ta, tb)
    assert sa["global_step"] == sb["global_step"] and sa["generator"] == sb["generator"]
    assert sa["action_rng"] == sb["action_rng"]
    rows_a, rows_b = read_metrics(full), read_metrics(cut)
    assert len(rows_a) == len(rows_b)  # metrics after the checkpoint were dropped, then re-logged
    for ra, rb in zip(rows_a, rows_b):
        assert {k: v for k, v in ra.items() if k not in TIMING_KEYS} == pytest.approx(
            {k: v for k, v in rb.items() if k not in TIMING_KEYS}, nan_ok=True)


def test_resume_rejects_changed_hyperparameters(tmp_path):
    train(_cartpole(total_steps=256), tmp_path, progress=False)
    with pytest.raises(UserError, match="learning_rate"):
        train(_cartpole(total_steps=256, learning_rate=5e-4), tmp_path, resume=True, progress=False)
    with pytest.raises(UserError, match="already"):
        train(_cartpole(total_steps=256), tmp_path, progress=False)


def test_normaliser_stats_saved_restored_and_used_in_evaluation(tmp_path):
    cfg = _pendulum(total_steps=512, eval_episodes=3)
    final = train(cfg, tmp_path, progress=False)
    tensors, _ = final_tensors(tmp_path)
    for key in ("obs_rms.mean", "obs_rms.var", "obs_rms.count", "ret_rms.var"):
        assert tensors[key].dtype == torch.float64
    assert tensors["obs_rms.count"].item() > 512  # every observation seen
    agent = load_agent(tmp_path)
    assert torch.equal(torch.from_numpy(agent.obs_norm.rms.mean), tensors["obs_rms.mean"])
    # evaluate_run with the run's eval seed reproduces the final logged evaluation (frozen stats); not bitwise
    # because training keeps the weights in one flat buffer and BLAS may round differently on other alignments
    result = evaluate_run(tmp_path, episodes=3)
    assert result["mean_return"] == pytest.approx(final["eval_return_mean"], rel=1e-6)
    # corrupting the stats changes the evaluation: they are really used
    agent_ckpt = latest_checkpoint(tmp_path)
    from proxrl.runs import save_checkpoint

    t, s = load_checkpoint(agent_ckpt)
    t["obs_rms.mean"] = t["obs_rms.mean"] + 5.0
    save_checkpoint(agent_ckpt, t, s)
    assert evaluate_run(tmp_path, episodes=3)["mean_return"] != pytest.approx(final["eval_return_mean"], rel=1e-3)


def test_plots_written_for_discrete_and_continuous(tmp_path):
    train(_cartpole(total_steps=512), tmp_path / "cp", progress=False)
    train(_pendulum(total_steps=512), tmp_path / "pd", progress=False)
    for run in ("cp", "pd"):
        paths = plot_run(tmp_path / run)
        assert {p.name for p in paths} == {"returns.png", "losses.png", "policy_map.png"}
        for p in paths:
            assert p.parent == tmp_path / run / "plots"
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_metrics_logged_per_update(tmp_path):
    train(_cartpole(total_steps=512, eval_every=256), tmp_path, progress=False)
    rows = read_metrics(tmp_path)
    assert [r["global_step"] for r in rows] == [256, 512]
    for key in ("episodic_return", "episodic_length", "policy_loss", "value_loss", "entropy", "approx_kl", "clipfrac",
                "explained_variance", "learning_rate", "clip_coef", "steps_per_second", "train_seconds",
                "eval_return_mean", "eval_return_std", "early_stop_epoch"):
        assert key in rows[-1], key
    assert rows[0]["learning_rate"] == pytest.approx(1e-3) and rows[1]["learning_rate"] == pytest.approx(5e-4)
    assert rows[1]["train_seconds"] > rows[0]["train_seconds"] > 0


def test_target_kl_stops_epochs_early(tmp_path):
    train(_cartpole(total_steps=512, target_kl=1e-6), tmp_path, progress=False)
    rows = read_metrics(tmp_path)
    assert all(r["early_stop_epoch"] < 20 for r in rows)


def test_cartpole_preset_learns(tmp_path):
    """A real (short) run: the deterministic evaluation return goes well above random (~20)."""
    cfg = ControlConfig(**{**PRESETS["CartPole-v1"], "eval_every": 5_000, "eval_episodes": 10, "seed": 1,
                           "tensorboard": False, "target_return": 200.0})
    train(cfg, tmp_path, progress=False)
    rows = read_metrics(tmp_path)
    evals = [r["eval_return_mean"] for r in rows if r.get("eval_return_mean") == r.get("eval_return_mean") and "eval_return_mean" in r]
    first_returns = [r["episodic_return"] for r in rows[:5] if r["episodic_return"] == r["episodic_return"]]
    assert max(evals) >= 200, evals  # stopped at the first evaluation >= 200 ...
    assert rows[-1]["global_step"] <= 30_000, evals  # ... well before the preset's 100k steps
    assert sum(first_returns) / len(first_returns) < 60


def _flushes_denormals() -> bool:
    """Whether this thread flushes float32 denormals to zero (1e-39 is one)."""
    return float(torch.tensor([1e-30], dtype=torch.float32) * 1e-9) == 0.0


def test_denormals_flushed_during_training_and_evaluation_and_restored_after(tmp_path):
    import gymnasium as gym

    seen = []

    class Probe(gym.Wrapper):
        def step(self, action):
            seen.append(_flushes_denormals())
            return self.env.step(action)

    assert not _flushes_denormals()
    train(_cartpole(total_steps=256, vector_mode="sync"), tmp_path / "r", progress=False,
          env_fn=lambda: Probe(gym.make("CartPole-v1")))
    assert seen and all(seen)
    assert not _flushes_denormals()
    # `proxrl eval` evaluates as training's evaluations did: flushed, then restored
    seen.clear()
    evaluate_run(tmp_path / "r", episodes=1, env_fn=lambda: Probe(gym.make("CartPole-v1")))
    assert seen and all(seen)
    assert not _flushes_denormals()
