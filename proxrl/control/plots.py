"""Figures of a control run, written as PNGs to ``run_dir/plots``.

* ``returns.png``: training episodic return (per update and a running mean) and evaluation returns (greedy or
  sampled actions, as the run's ``eval_deterministic``; mean +- std) against environment steps.
* ``losses.png``: policy/value loss, entropy, approx KL, clip fraction, explained variance, learning rate
  against updates (via :func:`proxrl.runs.plot_metrics`).
* ``policy_map.png`` (vector observations with Discrete or Box actions only; not drawn for images,
  MultiDiscrete or MultiBinary): the trained policy over a 2-D slice of observation space -- two observation dims on
  the axes spanning the range the greedy policy visits (+10%), the other dims fixed at their mean over those
  visits. Colour: probability of action 0 for two actions, the argmax action for more, the mean of action
  dim 0 for Box actions. The two dims are those the policy output is most sensitive to (mean |gradient| x
  std over the visited states) unless given. Visited states are drawn as dots.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from proxrl.control.checkpointing import LoadedAgent, load_agent
from proxrl.control.envs import EnvFactory
from proxrl.control.evaluate import Evaluator, eval_seed
from proxrl.errors import UserError
from proxrl.runs import RunDir, atomic_write, plot_metrics, read_metrics

__all__ = ["plot_run", "plot_returns", "plot_policy_map"]

OBS_NAMES = {
    "CartPole-v1": ["cart position", "cart velocity", "pole angle (rad)", "pole angular velocity"],
    "CartPole-v0": ["cart position", "cart velocity", "pole angle (rad)", "pole angular velocity"],
    "Pendulum-v1": ["cos(theta)", "sin(theta)", "angular velocity"],
    "Acrobot-v1": ["cos(t1)", "sin(t1)", "cos(t2)", "sin(t2)", "t1 velocity", "t2 velocity"],
    "MountainCar-v0": ["position", "velocity"],
}
LOSS_KEYS = ["policy_loss", "value_loss", "entropy", "approx_kl", "clipfrac", "explained_variance", "learning_rate",
             "clip_coef", "steps_per_second"]


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    return fig, FigureCanvasAgg(fig)


def _save(canvas, path: Path) -> Path:
    buf = io.BytesIO()
    canvas.print_png(buf)
    return atomic_write(path, buf.getvalue())


def plot_returns(run_dir: str | Path) -> Path:
    """Training and evaluation returns against environment steps -> ``plots/returns.png``."""
    rd = RunDir(run_dir)
    rows = read_metrics(rd.path)
    if not rows:
        raise UserError(f"no metrics in {rd.metrics_path}; train the run first")
    fig, canvas = _figure(7.5, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    train = [(r["global_step"], r["episodic_return"]) for r in rows if np.isfinite(r.get("episodic_return", np.nan))]
    if train:
        x, y = np.array(train).T
        ax.plot(x, y, color="tab:blue", alpha=0.3, linewidth=0.8, label="episodic return (per update)")
        k = max(1, len(y) // 20)
        smooth = np.convolve(y, np.ones(k) / k, mode="valid")
        ax.plot(x[k - 1 :], smooth, color="tab:blue", linewidth=1.8, label=f"running mean ({k} updates)")
    evals = [(r["global_step"], r["eval_return_mean"], r.get("eval_return_std", 0.0)) for r in rows
             if np.isfinite(r.get("eval_return_mean", np.nan))]
    if evals:
        x, m, s = np.array(evals).T
        greedy = bool(rd.read_config().get("eval_deterministic", True)) if rd.config_path.exists() else True
        ax.errorbar(x, m, yerr=s, color="tab:red", marker="o", markersize=4, capsize=3, linewidth=1.2,
                    label=f"{'greedy' if greedy else 'sampled-action'} eval (mean +- std)")
    ax.set_xlabel("environment steps")
    ax.set_ylabel("return")
    ax.set_title(f"{rd.path.name}: returns")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(canvas, rd.plots / "returns.png")


def _policy_output(agent: LoadedAgent, obs: torch.Tensor) -> torch.Tensor:
    """Scalar per observation ``(M,)`` that the map colours (differentiable in ``obs``)."""
    out = agent.policy.actor(_normalised(agent, obs))
    if agent.info.discrete:
        probs = out.softmax(-1)
        return probs[:, 0] if agent.info.action_dim == 2 else probs.max(-1).values
    return out[:, 0]


def _pick_dims(agent: LoadedAgent, states: np.ndarray) -> tuple[int, int]:
    d = states.shape[1]
    if d == 2:
        return 0, 1
    x = torch.tensor(states, dtype=torch.float32, requires_grad=True)
    _policy_output(agent, x).sum().backward()
    score = x.grad.abs().mean(0).numpy() * states.std(0)
    first, second = np.argsort(-score)[:2]
    return tuple(sorted((int(first), int(second))))  # type: ignore[return-value]


def plot_policy_map(
    run_dir: str | Path, dims: tuple[int, int] | None = None, env_fn: EnvFactory | None = None, resolution: int = 150
) -> Path:
    """The trained policy over a 2-D slice of observation space -> ``plots/policy_map.png``."""
    rd = RunDir(run_dir)
    agent = load_agent(rd.path)
    obs_dim = agent.info.obs_dim
    if agent.info.obs_kind != "vector" or agent.info.dist.kind not in ("categorical", "gaussian"):
        raise UserError(f"policy map needs vector observations and Discrete or Box actions; {agent.cfg.env_id!r} has "
                        f"{agent.info.obs_kind} observations and {agent.info.dist.kind} actions")
    if obs_dim < 2:
        raise UserError(f"policy map needs at least 2 observation dims, env has {obs_dim}")
    if dims is not None and (len(dims) != 2 or dims[0] == dims[1] or not all(0 <= d < obs_dim for d in dims)):
        raise UserError(f"dims={dims} must be two different observation indices in [0, {obs_dim - 1}]")
    evaluator = Evaluator(agent.cfg.env_id, 8, agent.cfg.vector_mode, env_fn)
    record: list[np.ndarray] = []
    try:
        evaluator.evaluate(agent.policy, agent.obs_norm, eval_seed(agent.cfg.seed), record=record)
    finally:
        evaluator.close()
    states = np.concatenate(record).astype(np.float64)
    if len(states) > 20_000:
        states = states[np.random.default_rng(0).choice(len(states), 20_000, replace=False)]
    i, j = dims if dims is not None else _pick_dims(agent, states)

    lo, hi = states.min(0), states.max(0)
    pad = 0.1 * np.maximum(hi - lo, 1e-3)
    gx = np.linspace(lo[i] - pad[i], hi[i] + pad[i], resolution)
    gy = np.linspace(lo[j] - pad[j], hi[j] + pad[j], resolution)
    grid = np.tile(states.mean(0), (resolution * resolution, 1))
    xx, yy = np.meshgrid(gx, gy)
    grid[:, i] = xx.ravel()
    grid[:, j] = yy.ravel()
    with torch.no_grad():
        if agent.info.discrete and agent.info.action_dim > 2:
            x = _normalised(agent, torch.tensor(grid, dtype=torch.float32))
            values = agent.policy.actor(x).argmax(-1).numpy().astype(float)
            label, cmap, vmin, vmax = "argmax action", "tab10", -0.5, 9.5
        else:
            values = _policy_output(agent, torch.tensor(grid, dtype=torch.float32)).numpy()
            if agent.info.discrete:
                label, cmap, vmin, vmax = "P(action 0)", "coolwarm", 0.0, 1.0
            else:
                low, high = float(agent.info.action_low[0]), float(agent.info.action_high[0])
                values = np.clip(values, low, high)
                label, cmap, vmin, vmax = "mean action[0] (clipped to bounds)", "coolwarm", low, high

    names = OBS_NAMES.get(agent.cfg.env_id, [])
    name = lambda k: f"obs[{k}]: {names[k]}" if k < len(names) else f"obs[{k}]"  # noqa: E731
    fig, canvas = _figure(6.5, 5.2)
    ax = fig.add_subplot(1, 1, 1)
    mesh = ax.pcolormesh(xx, yy, values.reshape(resolution, resolution), cmap=cmap, vmin=vmin, vmax=vmax,
                         shading="auto")
    ax.scatter(states[:, i], states[:, j], s=2, c="k", alpha=0.25, linewidths=0, label="visited (greedy policy)")
    fig.colorbar(mesh, ax=ax, label=label)
    ax.set_xlabel(name(i))
    ax.set_ylabel(name(j))
    others = [k for k in range(obs_dim) if k not in (i, j)]
    ax.set_title(f"{agent.cfg.env_id} policy at step {agent.state.get('global_step', '?')}"
                 + (f"\n(other obs dims {others} at their visited mean)" if others else ""), fontsize=10)
    ax.legend(loc="upper right", fontsize=7, markerscale=4)
    fig.tight_layout()
    return _save(canvas, rd.plots / "policy_map.png")


def _normalised(agent: LoadedAgent, x: torch.Tensor) -> torch.Tensor:
    if not agent.obs_norm.enabled:
        return x
    rms = agent.obs_norm.rms
    mean = torch.as_tensor(rms.mean, dtype=torch.float32)
    std = torch.as_tensor(np.sqrt(rms.var + agent.obs_norm.eps), dtype=torch.float32)
    return ((x - mean) / std).clamp(-agent.obs_norm.clip, agent.obs_norm.clip)


def plot_run(run_dir: str | Path, dims: tuple[int, int] | None = None, env_fn: EnvFactory | None = None) -> list[Path]:
    """Write all figures of a run to ``run_dir/plots`` (the policy map needs a checkpoint); returns the PNG paths.

    ``dims``: the two observation dims of the policy map (default: the two the policy is most sensitive to);
    ``env_fn``: needed only for runs trained on a Python env factory.
    """
    rd = RunDir(run_dir)
    if not rd.metrics_path.is_file():
        raise UserError(f"{rd.metrics_path} not found; is {rd.path} a proxrl run directory?")
    paths = [plot_returns(rd.path), plot_metrics(rd.path, "update", LOSS_KEYS, "losses.png", f"{rd.path.name}: PPO update")]
    if has_policy_map(rd.path):
        paths.append(plot_policy_map(rd.path, dims, env_fn))
    return paths


def has_policy_map(run_dir: str | Path) -> bool:
    """True when the run's policy can be drawn as a map: vector observations, Discrete or Box actions."""
    from proxrl.runs import latest_checkpoint, load_checkpoint

    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        return True  # plot_policy_map names the missing checkpoint
    space = load_checkpoint(ckpt)[1].get("space") or {}
    return space.get("obs_kind", "vector") == "vector" and (space.get("dist") or {}).get("kind", "categorical") in (
        "categorical", "gaussian")
