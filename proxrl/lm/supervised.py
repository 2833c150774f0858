"""The one training loop of the supervised LM stages (SFT and reward model).

A stage (:mod:`proxrl.lm.sft`, :mod:`proxrl.lm.reward_model`) reads its data, builds its model and hands
:func:`train_supervised` a :class:`Prepared`: the model, how many training examples there are, a ``step`` function
(example indices -> loss and statistics) and an ``evaluate`` function (held-out metrics). The loop owns everything
else, identically for both stages:

* the order of examples: a ``torch.Generator`` seeded with ``cfg.seed`` draws a fresh permutation whenever fewer
  than ``batch_size`` indices are left; a step takes the next ``batch_size``;
* AdamW (:func:`make_optimizer`) with linear warmup then cosine/linear/constant decay (:func:`lr_lambda`),
  gradient-norm clipping (``max_grad_norm``; None = no clipping, the norm is still logged);
* stopping at the first non-finite loss or gradient norm, before the optimizer step (the last checkpoint stays
  the newest good one);
* logging every ``log_every`` steps (``train_loss`` and the stage's statistics averaged over the window,
  ``grad_norm``, ``lr``, the stage's running totals), held-out evaluation at step 0, every ``eval_every`` steps and
  at the end, checkpoints every ``checkpoint_every`` steps, the final model saved at the run directory's top level;
* the run directory: locked for the life of the run, created and its ``config.yaml`` written only once the run (or
  the resume) is known to be valid, so a refused command changes nothing;
* resume (:func:`load_run_config`): bit-exact, the resumed run's metrics and weights equal an uninterrupted run's;
* devices and processes (docs/distributed.md): ``cfg.device`` (``--device``) holds the model and optimizer state,
  ``--bf16`` autocasts the forwards. Under ``torchrun --nproc_per_node N`` every step's ``batch_size`` examples (a
  global size) are split into N equal contiguous shares, one per process; the model is DDP-wrapped (``--fsdp``:
  sharded with FSDP2) and each process's loss is scaled by ``N * weight / global weight`` (``weight``: what the
  stage's loss averages over, e.g. target tokens), so the averaged gradient is that of the whole batch's mean: N
  processes train the same weights as one, up to the order of float sums. Logged metrics are over the whole batch;
  only rank 0 writes the run directory; a checkpoint written with N processes resumes with M.

Host round trips: a step queues its loss, gradient norm and statistics on the device; they are read (and checked
for NaN/inf, naming the first bad step) once per logging window, before each evaluation and checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

import torch

from proxrl import distributed as D
from proxrl.config import RUN_INFO_KEY, resume_config, to_dict
from proxrl.errors import UserError
from proxrl.lm.heads import model_device
from proxrl.lm.loading import save_model_and_tokenizer, unsharded_copy
from proxrl.lm.supervised_config import RewardModelConfig, SFTConfig
from proxrl.lm.train_state import load_train_state, resume_checkpoint, save_train_state
from proxrl.runs import MetricsLogger, RunDir, atomic_write, plot_metrics, progress_bar, read_metrics
from proxrl.runs.finite import check_finite

__all__ = ["StepResult", "Prepared", "LoopResult", "train_supervised", "load_run_config", "split_indices",
           "lr_lambda", "make_optimizer", "write_result", "RUN_INFO_KEY"]

#: config.yaml's section describing where the latest session ran (device, processes); not an option

Config = TypeVar("Config", SFTConfig, RewardModelConfig)


@dataclass
class StepResult:
    """What a stage's ``step`` returns for one batch (this process's share of it).

    ``loss``: the 0-d tensor to minimise (logged as ``train_loss``, averaged over the logging window);
    ``window``: other per-step statistics (0-d tensors or floats) logged as their mean over the window (e.g.
    ``train_accuracy``); ``totals``: counts added up over the whole run and logged as running totals (e.g.
    ``tokens``); ``weight``: what ``loss`` and ``window`` average over (e.g. the number of target tokens), None =
    the number of examples. With several processes the whole batch's values are the ``weight``-weighted means.
    """

    loss: torch.Tensor
    window: dict[str, Any] = field(default_factory=dict)
    totals: dict[str, int] = field(default_factory=dict)
    weight: float | None = None


@dataclass
class Prepared:
    """A stage ready to train: what :func:`train_supervised` needs from it.

    ``model`` is the HF model trained and saved; ``module`` (default ``model``) the module the stage calls, which
    the loop moves to the device and wraps (DDP) or shards (FSDP): its own ``forward`` must run every parameter's
    computation (e.g. :class:`~proxrl.lm.heads.SequenceScores` around a reward model). The stage's functions get
    the module to call, on the device (inputs go to :func:`~proxrl.lm.heads.model_device`):
    ``step(module, indices)`` computes the loss of the training examples ``indices`` (the loop does backward and
    the update); ``evaluate(module)`` returns held-out metrics named as logged (``eval_loss``, ``eval_accuracy``,
    ...) and leaves the model in the mode it found it in; ``final(module)`` (optional) returns metrics of the
    trained model for the stage's summary, computed once after the model is saved. With several processes every
    process evaluates the whole held-out set (the same forwards on every rank, as FSDP requires). ``outputs`` names
    the files or folders ``on_create(run_path)`` writes into a new run directory before training (e.g. a trained
    tokenizer), see ``RunDir.create``.
    """

    model: torch.nn.Module
    tokenizer: Any
    n_train: int
    step: Callable[[torch.nn.Module, list[int]], StepResult]
    evaluate: Callable[[torch.nn.Module], dict[str, float]]
    final: Callable[[torch.nn.Module], dict[str, float]] | None = None
    outputs: tuple[str, ...] = ()
    on_create: Callable[[Path], None] | None = None
    module: torch.nn.Module | None = None


@dataclass
class LoopResult:
    """How a run ended: ``steps`` (total), the held-out metrics before (``eval_initial``) and after (``eval``)
    training, the running ``totals``, ``train_loss`` (mean of the last logged window), what the stage's ``final()``
    returned, and the run directory."""

    steps: int
    eval_initial: dict[str, float]
    eval: dict[str, float]
    totals: dict[str, int]
    train_loss: float
    final: dict[str, float]
    run_dir: Path


def lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the peak LR at optimizer step ``s`` (0-based): linear warmup ``(s + 1) / warmup`` (the first
    step already trains), then cosine / linear decay to 0 at step ``total``, or constant."""

    def f(s: int) -> float:
        if warmup and s < warmup:
            return (s + 1) / warmup
        if schedule == "constant" or total <= warmup:
            return 1.0
        frac = min(1.0, (s - warmup) / max(1, total - warmup))
        if schedule == "linear":
            return max(0.0, 1.0 - frac)
        return 0.5 * (1.0 + math.cos(math.pi * frac))

    return f


def make_optimizer(model: torch.nn.Module, learning_rate: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases, LayerNorm weights or other 1-d parameters)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=learning_rate)


def split_indices(n: int, eval_fraction: float, seed: int, max_eval: int | None = None, source: str = "data",
                  unit: str = "examples") -> tuple[list[int], list[int]]:
    """Shuffle ``range(n)`` with ``random.Random(seed)``; the first ``round(n * eval_fraction)`` (at least 1 when
    ``eval_fraction > 0`` and n >= 2, at most ``max_eval``) are held out. Returns ``(eval, train)`` indices.

    Raises:
        UserError: nothing is left for training.
    """
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_eval = int(round(n * eval_fraction))
    if max_eval is not None:
        n_eval = min(max_eval, n_eval)
    if eval_fraction > 0 and n >= 2:
        n_eval = max(1, n_eval)
    if n_eval >= n:
        raise UserError(f"{source}: {n} {unit} leave none for training after holding out {n_eval}; lower "
                        f"--eval-fraction or add data")
    return order[:n_eval], order[n_eval:]


def load_run_config(cls: type[Config], run_dir: str | Path, given: Mapping[str, Any] | None = None) -> Config:
    """The config saved in ``run_dir/config.yaml``, to resume that run in ``run_dir`` (wherever it was moved).

    ``given``: options passed with the ``--resume`` (flags and a ``--config`` file). Those in
    ``cls.resumable_fields`` replace the saved values; any other that differs from the saved run is a one-line
    UserError (see :func:`proxrl.config.resume_config`).
    """
    run = RunDir(run_dir)
    saved = run.read_config()
    saved.pop(RUN_INFO_KEY, None)
    stage = saved.pop("stage", cls.stage)
    if stage != cls.stage:
        raise UserError(f"{run.path} is a {stage} run, not a {cls.stage} run; resume it with "
                        f"`proxrl {str(stage).replace('_', '-')} --resume {run.path}`")
    saved["run_dir"] = str(run_dir)
    return resume_config(cls, saved, dict(given or {}), source=str(run.config_path))


def write_result(run_dir: Path, name: str, result: Mapping[str, Any]) -> Path:
    """Write a stage's summary to ``run_dir/<name>_result.json`` (atomically)."""
    return atomic_write(Path(run_dir) / f"{name}_result.json", json.dumps(dict(result), indent=1) + "\n")


def _total_steps(cfg: Config, n_train: int) -> int:
    return cfg.max_steps or max(1, math.ceil(cfg.epochs * max(1, math.ceil(n_train / cfg.batch_size))))


def train_supervised(cfg: Config, prepare: Callable[[], Prepared], *, resume: bool, name: str,
                     plot: tuple[Sequence[str], str, str], progress: bool | None = None) -> LoopResult:
    """Run the supervised loop of one stage in ``cfg.run_dir`` (see the module doc).

    Args:
        cfg: the stage's config (the loop reads the options of :class:`~proxrl.lm.supervised_config.SupervisedOptions`).
        prepare: reads the data and builds the model (called once the run directory is locked and, when
            resuming, its checkpoint found; nothing is written before it returns).
        resume: continue ``cfg.run_dir`` from its newest checkpoint.
        name: the stage's name in messages and on the progress bar ("sft", "reward model").
        plot: ``(metric keys, PNG file name, title)`` of the run's plot.
        progress: show a progress bar (None: ``cfg.progress``).

    Returns:
        :class:`LoopResult`. The final model and tokenizer are saved at the top level of the run directory. Under
        torchrun every process returns it; only rank 0 writes.

    Raises:
        UserError: no checkpoint to resume, a resume whose step budget is below the step reached, a checkpoint that
        does not fit the model, a non-finite loss or gradient norm, a device that does not exist, ``--fsdp``
        without torchrun, a batch size the processes cannot share evenly, or whatever ``prepare`` raises.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = D.resolve_device(cfg.device)
    if cfg.bf16:
        D.require_native_bf16(device)
    if cfg.fsdp:
        D.require_distributed("--fsdp")
    dist = D.init_distributed(device)
    D.configure_device(device)
    share = D.shard_indices(cfg.batch_size, dist.rank, dist.world_size, what="batch_size")
    run = RunDir(cfg.run_dir)
    with run.lock() if dist.is_main else contextlib.nullcontext():
        ckpt = None
        if resume:  # rank 0 picks the checkpoint, every rank reads it
            ckpt = resume_checkpoint(run) if dist.is_main else None
            ckpt = Path(D.broadcast_object(str(ckpt) if ckpt is not None else ""))
        stage = prepare()
        model = stage.model
        module = (stage.module if stage.module is not None else model).to(device)
        module = D.fsdp_shard(module, device, cfg.bf16) if cfg.fsdp else D.wrap_ddp(module, device)
        total = _total_steps(cfg, stage.n_train)
        optimizer = make_optimizer(model, cfg.learning_rate, cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.lr_schedule, cfg.warmup_steps, total))
        gen = torch.Generator().manual_seed(cfg.seed)
        start, loop = 0, None
        if ckpt is not None:
            start, loop = load_train_state(ckpt, model, optimizer, scheduler, gen)
            if total < start:
                raise UserError(f"{run.path} is already at step {start} but --max-steps/--epochs now give {total} "
                                f"steps; give at least {start}")
        if dist.is_main:
            run.create(exist_ok=cfg.overwrite or resume, outputs=stage.outputs)
            where = {"device": str(device), "processes": dist.world_size}
            run.write_config({"stage": cfg.stage, **to_dict(cfg), RUN_INFO_KEY: where})
            if ckpt is None and stage.on_create is not None:
                stage.on_create(run.path)
            print(f"{name}: device {device}" + (f", {dist.world_size} processes (torchrun)" if dist.distributed
                                                else ""), flush=True)
        return _loop(cfg, run, stage, module, optimizer, scheduler, gen, start, total, loop, name, plot, progress,
                     dist, share)


class _Pending:
    """The steps since the last read of their statistics: device tensors, read and checked in one go by :meth:`flush`.

    Each step queues ``[loss * w, window * w ..., w, totals ...]`` (float64; ``w`` its weight) and its gradient
    norm; :meth:`flush` sums the rows over processes (one all-reduce), reads them (one host round trip) and returns
    per step the whole batch's ``(loss, window dict, totals dict, grad_norm)``, raising at the first non-finite loss or
    gradient norm. With one process ``loss * w / w`` is the step's own loss exactly (a float32 times an integer
    weight is exact in float64)."""

    def __init__(self, name: str, hint: str) -> None:
        self.name, self.hint = name, hint
        self.steps: list[int] = []
        self.rows: list[torch.Tensor] = []
        self.norms: list[torch.Tensor] = []
        self.window_keys: list[str] = []
        self.total_keys: list[str] = []

    def add(self, step: int, out: StepResult, weight: float, gnorm: torch.Tensor) -> None:
        if not self.steps:
            self.window_keys, self.total_keys = list(out.window), list(out.totals)
        loss = out.loss.detach()
        vals = torch.stack([loss.reshape(()).to(torch.float64)] + [
            torch.as_tensor(out.window[k], dtype=torch.float64, device=loss.device).detach().reshape(())
            for k in self.window_keys])
        tail = torch.tensor([weight] + [float(out.totals[k]) for k in self.total_keys], dtype=torch.float64)
        self.rows.append(torch.cat([vals * weight, tail.to(loss.device)]))
        self.norms.append(gnorm.detach().reshape(()).to(torch.float64))
        self.steps.append(step)

    def flush(self) -> list[tuple[int, float, dict[str, float], dict[str, int], float]]:
        if not self.steps:
            return []
        rows = D.all_reduce_sum(torch.stack(self.rows)).tolist()
        norms = torch.stack(self.norms).tolist()
        nw = 1 + len(self.window_keys)
        out = []
        for step, row, gnorm in zip(self.steps, rows, norms):
            w = row[nw]
            loss = row[0] / w
            check_finite(f"{self.name} loss", loss, f"step {step}", self.hint)
            check_finite("gradient norm", gnorm, f"step {step}", self.hint)
            window = {k: row[1 + i] / w for i, k in enumerate(self.window_keys)}
            totals = {k: int(round(row[nw + 1 + i])) for i, k in enumerate(self.total_keys)}
            out.append((step, loss, window, totals, gnorm))
        self.steps, self.rows, self.norms = [], [], []
        return out


def _grad_norm(model: torch.nn.Module, clip: float) -> torch.Tensor:
    """Clip the gradient norm of ``model``'s parameters to ``clip`` (inf: only measure); the norm as a plain tensor
    (FSDP returns a replicated DTensor)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def _loop(cfg: Config, run: RunDir, stage: Prepared, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
          scheduler: Any, gen: torch.Generator, start: int, total: int, loop: dict[str, Any] | None, name: str,
          plot: tuple[Sequence[str], str, str], progress: bool | None, dist: D.DistInfo, share: slice) -> LoopResult:
    model = stage.model
    main = dist.is_main
    plain = D.unwrap_model(module)  # evaluation: no DDP hooks (an FSDP module stays sharded: every rank calls it)

    def evaluate() -> dict[str, float]:
        out = stage.evaluate(plain)
        if hasattr(module, "reshard"):  # FSDP2 keeps the root gathered after a no-grad forward: back to shards
            module.reshard()
        return out

    logger = MetricsLogger(run.path, resume_from_step=start if loop is not None else None) if main else None
    if loop is None:
        perm: list[int] = []
        windows: dict[str, list[float]] = {}
        totals: dict[str, int] = {}
        ev0 = evaluate()
        ev = ev0
        if logger is not None:
            logger.log(0, ev0)
    else:
        perm, windows, totals, ev0, ev = (loop["perm"], loop["windows"], loop["totals"], loop["eval_initial"],
                                          loop["eval"])
    module.train()
    show = (cfg.progress if progress is None else progress) and main
    bar = progress_bar(total, desc=name, unit="step", disable=None if show else True)
    bar.update(start)
    clip = cfg.max_grad_norm if cfg.max_grad_norm is not None else math.inf
    hint = "start again with a lower --learning-rate (or --max-grad-norm)"
    pending = _Pending(name, hint)
    gnorm_last = math.nan
    autocast_device = model_device(model)

    def read_pending() -> None:
        nonlocal gnorm_last
        for _, loss, window, step_totals, gnorm in pending.flush():
            for key, value in {"train_loss": loss, **window}.items():
                windows.setdefault(key, []).append(value)
            for key, value in step_totals.items():
                totals[key] = totals.get(key, 0) + value
            gnorm_last = gnorm

    try:
        for step in range(start + 1, total + 1):
            if len(perm) < cfg.batch_size:
                perm += torch.randperm(stage.n_train, generator=gen).tolist()
            idx, perm = perm[:cfg.batch_size], perm[cfg.batch_size:]
            with D.autocast(autocast_device, cfg.bf16):
                out = stage.step(module, idx[share])
            weight = float(out.weight if out.weight is not None else len(idx[share]))
            loss = out.loss
            if dist.distributed:  # the gradient of the whole batch's mean once DDP/FSDP average over processes
                scale = dist.world_size * weight / float(D.all_reduce_sum(torch.tensor([weight], dtype=torch.float64))[0])
                loss = loss * scale
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = _grad_norm(model, clip)
            optimizer.step()
            scheduler.step()
            pending.add(step, out, weight, gnorm)
            metrics: dict[str, float] = {}
            log_now = step % cfg.log_every == 0 or step == total
            eval_now = step % cfg.eval_every == 0 or step == total
            save_now = bool(cfg.checkpoint_every) and step % cfg.checkpoint_every == 0 and step != total
            if log_now or eval_now or save_now:
                read_pending()
            if log_now:
                metrics.update({k: sum(v) / len(v) for k, v in windows.items()})
                metrics.update(grad_norm=gnorm_last, lr=scheduler.get_last_lr()[0], **totals)
                bar.set_postfix({k.removeprefix("train_"): v for k, v in metrics.items() if k in windows})
                windows = {}
            if eval_now:
                ev = evaluate()
                metrics.update(ev)
            if metrics and logger is not None:
                logger.log(step, metrics)
            if save_now:
                save_train_state(run, step, model, optimizer, scheduler, gen, keep=cfg.keep_checkpoints, loop={
                    "perm": perm, "windows": windows, "totals": totals, "eval_initial": ev0, "eval": ev})
            bar.update(1)
    finally:
        bar.close()
        if logger is not None:
            logger.close()
    model.eval()
    weights = D.full_state_dict(model) if cfg.fsdp else None  # collective: every rank
    if main:
        save_model_and_tokenizer(unsharded_copy(model, weights) if weights is not None else model, stage.tokenizer,
                                 run.path)
    final = stage.final(plain) if stage.final is not None else {}
    if hasattr(module, "reshard"):
        module.reshard()
    if not main:
        return LoopResult(steps=total, eval_initial=ev0, eval=ev, totals=totals, train_loss=math.nan, final=final,
                          run_dir=run.path)
    keys, filename, title = plot
    try:
        plot_metrics(run.path, "step", list(keys), filename, title)
    except UserError:
        pass
    logged = [r["train_loss"] for r in read_metrics(run.path) if "train_loss" in r]
    return LoopResult(steps=total, eval_initial=ev0, eval=ev, totals=totals,
                      train_loss=logged[-1] if logged else math.nan, final=final, run_dir=run.path)
