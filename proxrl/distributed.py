"""Devices and multi-process training on PyTorch's own engine: torchrun, ``torch.distributed``, DDP, FSDP2.

The trainers call the few functions of this module and nothing else of :mod:`torch.distributed`, so a
1-process run (plain ``python``/``proxrl``, or ``torchrun --nproc_per_node 1``) needs no process group and
every collective below is then a no-op that returns its input's value.

Devices
    :func:`resolve_device` (``auto|cpu|cuda|cuda:N|mps``), :func:`configure_device` (TF32 matmuls on CUDA),
    :func:`autocast` (bf16 autocast on CUDA/CPU).
Process group
    :func:`init_distributed` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT``) and returns a :class:`DistInfo`; gloo on CPU, NCCL (plus gloo for CPU
    tensors) on CUDA; timeout ``PROXRL_DIST_TIMEOUT`` seconds (default 60).
Whole-batch statistics over all ranks
    :func:`masked_mean`, :func:`masked_var`, :func:`global_normalize`, :func:`explained_variance` equal the
    single-process :mod:`proxrl.core` functions on the concatenation of every rank's data (up to the order of
    float sums); :func:`mean_over_ranks` for logged metrics; :func:`all_ranks_agree_stop` for the target-KL
    early stop; :func:`all_reduce_mean_` for the control fast path's flat gradient (tensor or numpy array);
    :func:`all_gather_cat` to give every rank the whole rollout.
Work split
    :func:`shard_indices` (whole GRPO/RLOO groups stay on one rank), :func:`per_rank_seed`.
Models
    :func:`wrap_ddp` (DDP), :func:`fsdp_shard` (FSDP2 ``fully_shard`` per transformer block),
    :func:`full_state_dict` / :func:`load_full_state_dict` (whole-model weights for rank 0 to save, any N).
Failure
    :func:`run_main` / :func:`fail_fast`: a rank that raises prints ``error: rank R: <cause>`` once and ends
    its process with a non-zero code, so torchrun tears the other ranks down; a rank stuck in a collective
    whose peer vanished gives up after the process-group timeout.

See docs/distributed.md for the global-batch semantics and launch recipes.
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import json
import math
import os
import re
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, TypeVar

import numpy as np
import torch
from torch import Tensor

from proxrl.core.losses import explained_variance as core_explained_variance
from proxrl.errors import UserError

__all__ = [
    "DistInfo",
    "resolve_device",
    "configure_device",
    "autocast",
    "native_bf16",
    "require_native_bf16",
    "init_distributed",
    "dist_info",
    "is_main",
    "is_distributed",
    "single_node",
    "require_distributed",
    "barrier",
    "shutdown",
    "all_reduce_sum",
    "all_reduce_mean",
    "all_reduce_mean_",
    "all_reduce_max",
    "all_gather_cat",
    "broadcast_object",
    "masked_mean",
    "masked_var",
    "global_normalize",
    "explained_variance",
    "mean_over_ranks",
    "all_ranks_agree_stop",
    "shard_indices",
    "per_rank_seed",
    "wrap_ddp",
    "unwrap_model",
    "transformer_blocks",
    "fsdp_shard",
    "full_state_dict",
    "load_full_state_dict",
    "run_main",
    "fail_fast",
    "DEFAULT_TIMEOUT_S",
]

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 60.0
TIMEOUT_ENV = "PROXRL_DIST_TIMEOUT"
# A non-main rank that fails waits this long before reporting, so that when every rank hits the same bad input
# rank 0 reports it and torchrun (which polls its workers every 0.1 s) ends the others before they print.
_REPORT_GRACE_S = 1.5
_FAILED_KEY = "proxrl/failed"
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"


# ============================================================================================ devices


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"environment variable {name}={raw!r} is not an integer; launch with torchrun, "
                        f"which sets it") from None


def resolve_device(spec: str) -> torch.device:
    """The device named by ``spec``: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (case-insensitive).

    ``auto`` is CUDA when available, else CPU. Under torchrun, ``auto`` and ``cuda`` mean
    ``cuda:LOCAL_RANK`` (one GPU per process); ``cuda:N`` with several processes on the node is rejected,
    since it would put them all on one GPU.

    Raises:
        UserError: (one line) CUDA or MPS requested but not available, a CUDA index this machine lacks,
            ``LOCAL_RANK`` beyond the visible GPUs, or an unknown spec.
    """
    s = str(spec).strip().lower()
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", 1)
    if s == "cpu":
        return torch.device("cpu")
    if s == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise UserError(f"device {spec!r}: MPS (Apple GPU) is not available in this torch build/machine; "
                            f"use --device cpu or auto")
        return torch.device("mps")
    if s == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        s = "cuda"
    if s == "cuda" or s.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UserError(f"device {spec!r}: CUDA is not available (torch {torch.__version__}, "
                            f"{'no CUDA build' if torch.version.cuda is None else 'no GPU visible'}); "
                            f"use --device cpu or auto")
        count = torch.cuda.device_count()
        if s == "cuda":
            index = local_rank
            if index >= count:
                raise UserError(f"device {spec!r}: LOCAL_RANK={local_rank} but only {count} CUDA device(s) are "
                                f"visible; run at most {count} processes per node")
            return torch.device("cuda", index)
        tail = s[len("cuda:"):]
        if not tail.isdigit():
            raise UserError(f"device {spec!r} is not a device; use {DEVICE_CHOICES}")
        index = int(tail)
        if index >= count:
            raise UserError(f"device {spec!r}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
        if local_world > 1:
            raise UserError(f"device {spec!r} with {local_world} processes per node would put them all on one "
                            f"GPU; use --device cuda (each process takes cuda:LOCAL_RANK)")
        return torch.device("cuda", index)
    raise UserError(f"device {spec!r} is not a device; use {DEVICE_CHOICES}")


def configure_device(device: torch.device) -> None:
    """Make ``device`` the current device and allow TF32 matmuls and convolutions on CUDA (no-op elsewhere).

    TF32 keeps fp32 range with a 10-bit mantissa on Ampere and newer GPUs (~1e-3 relative error per matmul),
    the usual setting for training (PyTorch's ``float32_matmul_precision = "high"``).
    """
    if device.type != "cuda":
        return
    torch.cuda.set_device(device)
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """``torch.autocast(device.type, dtype=torch.bfloat16)`` on CUDA and CPU when ``bf16``, else a no-op context.

    Weights and optimizer state stay float32; matmuls (and the other autocast-listed ops) run in bf16.
    """
    if bf16 and device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively: a CUDA device, or a CPU with AVX512-BF16 or AMX (oneDNN's
    own probe). Elsewhere torch emulates bf16 matmuls and convolutions, ~10-20x slower than float32 (a 4-layer
    GPT-2 forward+backward, the Nature CNN: benchmarks/README.md)."""
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(probe is not None and probe())


def require_native_bf16(device: torch.device) -> None:
    """One-line :class:`UserError` for ``--bf16 true`` on a CPU without native bfloat16 (:func:`native_bf16`),
    where bf16 autocast would make training ~10-20x slower instead of faster; nothing on CUDA or other devices
    (where :func:`autocast` does not apply bf16)."""
    if device.type == "cpu" and not native_bf16(device):
        raise UserError("--bf16 true: this CPU has no native bfloat16 (AVX512-BF16 or AMX), so bf16 autocast would run "
                        "~10-20x slower than float32 here; use --bf16 false (or a CUDA device)")


# ============================================================================================ process group


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job. A 1-process run is ``DistInfo(0, 1, 0, True)``.

    Attributes:
        rank: global rank in ``[0, world_size)``. world_size: number of processes in the job.
        local_rank: rank on this node (picks the GPU). is_main: ``rank == 0``, the only rank that writes the
            run directory, metrics, checkpoints and the progress bar.
    """

    rank: int
    world_size: int
    local_rank: int
    is_main: bool

    @property
    def distributed(self) -> bool:
        """True when there are several processes (and so a process group)."""
        return self.world_size > 1


def _env_info() -> DistInfo:
    rank = _env_int("RANK", 0)
    world = _env_int("WORLD_SIZE", 1)
    local = _env_int("LOCAL_RANK", 0)
    return DistInfo(rank=rank, world_size=world, local_rank=local, is_main=rank == 0)


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def dist_info() -> DistInfo:
    """This process's :class:`DistInfo`: from the process group once initialised, else from torchrun's env vars."""
    if _initialized():
        rank = torch.distributed.get_rank()
        return DistInfo(rank=rank, world_size=torch.distributed.get_world_size(),
                        local_rank=_env_int("LOCAL_RANK", 0), is_main=rank == 0)
    return _env_info()


def is_main() -> bool:
    """True on rank 0 (and in a 1-process run)."""
    return dist_info().is_main


def is_distributed() -> bool:
    """True when a process group with more than one process is up."""
    return _initialized() and torch.distributed.get_world_size() > 1


def single_node() -> bool:
    """True when every process of the job runs on this machine: a 1-process run, or torchrun's
    ``LOCAL_WORLD_SIZE`` equal to the world size (False when it is missing). Such processes share one CPU
    type and one set of libraries, so identical CPU computations on identical inputs give identical bits on
    all of them (the control trainer relies on that to compute small minibatches on every process)."""
    info = dist_info()
    return info.world_size == 1 or _env_int("LOCAL_WORLD_SIZE", 0) == info.world_size


def require_distributed(option: str) -> None:
    """Raise a one-line UserError unless this process runs under torchrun with several processes.

    For options that only make sense with several processes, e.g. ``require_distributed("--fsdp")``.
    """
    if _env_info().world_size <= 1:
        raise UserError(f"{option} needs several processes: launch with "
                        f"`torchrun --nproc_per_node N -m proxrl.cli ...` (N >= 2) or drop {option}")


def _timeout_s() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "")
    if not raw.strip():
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise UserError(f"{TIMEOUT_ENV}={raw!r} must be a positive number of seconds (default {DEFAULT_TIMEOUT_S:g})")
    return value


def init_distributed(device: torch.device | None = None) -> DistInfo:
    """Join the job described by torchrun's environment; returns this process's :class:`DistInfo`.

    With ``WORLD_SIZE`` unset or 1 nothing is initialised (every helper here is then a no-op). Otherwise the
    default process group is created from ``MASTER_ADDR``/``MASTER_PORT`` (``env://``): backend ``gloo`` for a
    CPU ``device`` (or ``None``), ``cpu:gloo,cuda:nccl`` for a CUDA one (NCCL for CUDA tensors, gloo for the
    small CPU ones such as the early-stop vote), with a timeout of ``PROXRL_DIST_TIMEOUT`` seconds (default
    60): a collective that waits longer for a vanished or stuck peer raises instead of hanging. Calling it
    again returns the same info.

    Args:
        device: the device this rank computes on (from :func:`resolve_device`; ``cuda:LOCAL_RANK`` under
            torchrun). It becomes the current CUDA device.

    Raises:
        UserError: torchrun's variables are inconsistent or missing (e.g. ``WORLD_SIZE=2`` without
            ``MASTER_ADDR``), the timeout variable is not a positive number, or ``device`` is MPS.
    """
    info = _env_info()
    if _initialized():
        return dist_info()
    if info.world_size <= 1:
        return DistInfo(rank=0, world_size=1, local_rank=info.local_rank, is_main=True)
    if not 0 <= info.rank < info.world_size:
        raise UserError(f"RANK={info.rank} is outside [0, WORLD_SIZE={info.world_size}); launch with torchrun")
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise UserError(f"WORLD_SIZE={info.world_size} but {' and '.join(missing)} not set; launch with "
                        f"`torchrun --nproc_per_node N ...` (or set them as torchrun does)")
    if not torch.distributed.is_available():
        raise UserError("this torch build has no torch.distributed; run with one process")
    timeout = datetime.timedelta(seconds=_timeout_s())
    if device is not None and device.type == "mps":
        raise UserError("several processes on MPS are not supported (no collective backend); use --device cpu")
    if device is not None and device.type == "cuda":
        configure_device(device)
        torch.distributed.init_process_group(backend="cpu:gloo,cuda:nccl", timeout=timeout, device_id=device,
                                             rank=info.rank, world_size=info.world_size)
    else:
        torch.distributed.init_process_group(backend="gloo", timeout=timeout, rank=info.rank,
                                             world_size=info.world_size)
    return dist_info()


def barrier() -> None:
    """Wait until every rank gets here (no-op without a process group)."""
    if is_distributed():
        torch.distributed.barrier()


def shutdown() -> None:
    """Destroy the process group if there is one (call once at the end of a successful run, on every process).

    The processes first meet at a barrier, so none tears its connections down while another still uses them,
    and unreachable objects that may still hold the group (a DDP reducer in a reference cycle) are collected, so
    the group is destroyed here rather than during interpreter shutdown, where gloo can abort the process.
    """
    if _initialized():
        gc.collect()
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


# ============================================================================================ collectives


def _check_group() -> bool:
    """True when collectives must run; raises if torchrun says several processes but none was initialised."""
    if _initialized():
        return torch.distributed.get_world_size() > 1
    if _env_info().world_size > 1:
        raise RuntimeError("WORLD_SIZE > 1 but the process group is not initialised; call "
                           "proxrl.distributed.init_distributed() first")
    return False


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum of ``x`` over all ranks (a new tensor; ``x`` is unchanged). Any shape, same on every rank."""
    out = x.detach().clone()
    if _check_group():
        torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM)
    return out


def all_reduce_mean(x: Tensor) -> Tensor:
    """Mean of ``x`` over all ranks (a new tensor). Integer tensors are summed then divided (float result)."""
    out = all_reduce_sum(x)
    n = dist_info().world_size if _check_group() else 1
    if not out.is_floating_point():
        out = out.double()
    return out / n if n > 1 else out


def all_reduce_max(x: Tensor) -> Tensor:
    """Element-wise maximum of ``x`` over all ranks (a new tensor), e.g. the longest response for padding."""
    out = x.detach().clone()
    if _check_group():
        torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.MAX)
    return out


def all_reduce_mean_(flat: Tensor | np.ndarray, weight: float | None = None) -> Tensor | np.ndarray:
    """Average ``flat`` over all ranks IN PLACE and return it; for the control fast path's flat gradient.

    ``weight=None``: ``flat <- (1/N) sum_r flat_r`` (one all-reduce), right when every rank's gradient is the
    mean over an equal share of the minibatch. With ``weight`` (the rank's sample count ``n_r`` behind its
    mean gradient): ``flat <- sum_r n_r flat_r / sum_r n_r``, the gradient of the mean over the whole
    minibatch when shares are unequal (two all-reduces, the second of one scalar).

    Accepts a contiguous torch tensor or numpy array (shared memory through ``torch.from_numpy``), any
    float dtype. Call it once per optimizer step, after the rank's local gradient and before gradient
    clipping, so clipping and Adam see the global gradient.
    """
    if not _check_group():
        return flat
    t = torch.from_numpy(flat) if isinstance(flat, np.ndarray) else flat
    if not t.is_contiguous():
        raise ValueError("all_reduce_mean_ needs a contiguous tensor/array (it reduces in place)")
    if weight is None:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        t.div_(torch.distributed.get_world_size())
        return flat
    t.mul_(float(weight))
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    total = all_reduce_sum(torch.tensor([float(weight)], dtype=torch.float64))
    t.div_(float(total[0]))
    return flat


def all_gather_cat(x: Tensor, dim: int = 0, equal_sizes: bool = False) -> Tensor:
    """Concatenate every rank's ``x`` along ``dim`` in rank order (rank 0's part first); ``x`` itself with one
    process. Sizes along ``dim`` may differ between ranks; the other dims and the dtype must match (pad e.g.
    response tensors to :func:`all_reduce_max` of their length first). Bool tensors are supported.
    ``equal_sizes=True`` promises every rank the same shape, which saves the all-reduce of the sizes (one
    collective instead of two; for the control rollout's per-step and per-update gathers).

    Use it to give every rank the whole rollout after the expensive per-rank part (env steps, generation,
    scoring), so that advantages and the minibatch order are computed exactly as one process would: a control
    rollout ``(T, n_envs_local, ...)`` gathered along ``dim=1`` is the 1-process ``(T, num_envs, ...)`` when rank
    r runs the global envs ``shard_indices(num_envs, r, N)``.
    """
    if not _check_group():
        return x
    if dim != 0:
        return all_gather_cat(x.movedim(dim, 0), 0, equal_sizes).movedim(0, dim)
    world = torch.distributed.get_world_size()
    src = x.detach().contiguous()
    is_bool = src.dtype == torch.bool
    if is_bool:
        src = src.to(torch.uint8)
    if equal_sizes:
        parts = [torch.empty_like(src) for _ in range(world)]
        torch.distributed.all_gather(parts, src)
        out = torch.cat(parts)
        return out.bool() if is_bool else out
    sizes = torch.zeros(world, dtype=torch.int64, device=src.device)
    sizes[torch.distributed.get_rank()] = src.shape[0]
    sizes = all_reduce_sum(sizes).tolist()
    longest = max(sizes)
    if src.shape[0] < longest:
        pad = src.new_zeros((longest - src.shape[0],) + tuple(src.shape[1:]))
        src = torch.cat([src, pad])
    parts = [torch.empty_like(src) for _ in range(world)]
    torch.distributed.all_gather(parts, src)
    out = torch.cat([p[:n] for p, n in zip(parts, sizes)])
    return out.bool() if is_bool else out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank. JSON-serialisable values only (sent as JSON, never pickled).

    Use it for decisions one rank takes (e.g. rank 0's resume checkpoint path and step).
    """
    if not _check_group():
        return obj
    rank = torch.distributed.get_rank()
    payload = json.dumps(obj).encode("utf-8") if rank == src else b""
    size = torch.tensor([len(payload)], dtype=torch.int64)
    torch.distributed.broadcast(size, src=src)
    buf = (torch.frombuffer(bytearray(payload), dtype=torch.uint8) if rank == src
           else torch.empty(int(size.item()), dtype=torch.uint8))
    if buf.numel():
        torch.distributed.broadcast(buf, src=src)
    return obj if rank == src else json.loads(buf.numpy().tobytes().decode("utf-8"))


def _weights(x: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return torch.ones_like(x)
    if mask.dim() != x.dim() or any(m not in (1, s) for m, s in zip(mask.shape, x.shape)):
        raise ValueError(f"shape mismatch: mask{tuple(mask.shape)} does not match x{tuple(x.shape)}; the mask "
                         "needs the same number of dims and sizes equal (or 1)")
    return mask.to(x.dtype).expand_as(x)


def _masked_sum(x: Tensor, m: Tensor) -> Tensor:
    """``sum_i m_i x_i`` where entries with ``m_i = 0`` never contribute (even NaN/inf ones)."""
    return torch.where(m != 0, x * m, torch.zeros((), dtype=x.dtype, device=x.device)).sum()


def _global_moments(x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """(global weighted sum, global weight sum, global number of non-zero weights), one all-reduce."""
    m = _weights(x, mask)
    local = torch.stack([_masked_sum(x, m), m.sum(), (m != 0).sum().to(x.dtype)])
    s = all_reduce_sum(local)
    return s[0], s[1], s[2]


def masked_mean(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """Masked mean over the entries of every rank: ``sum_ranks sum_i m_i x_i / sum_ranks sum_i m_i``.

    Equals :func:`proxrl.core.masked_mean` (``dim=None``) of the concatenated data. Ranks may hold different
    numbers of entries. Args: ``x`` any shape; ``mask`` ``None`` or broadcastable with ``x``'s number of
    dims. Returns a 0-d tensor (NaN if no rank has a valid entry). One all-reduce.
    """
    total, weight, _ = _global_moments(x, mask)
    return total / weight


def _masked_var_from(x: Tensor, m: Tensor, mean: Tensor, weight: Tensor, unbiased: bool) -> Tensor:
    sq = all_reduce_sum(_masked_sum((x - mean) ** 2, m).reshape(1))[0]
    var = sq / weight
    if unbiased:
        var = var * weight / (weight - 1) if weight > 1 else torch.full_like(var, float("nan"))
    return var


def masked_var(x: Tensor, mask: Tensor | None = None, unbiased: bool = True) -> Tensor:
    """Masked variance over the entries of every rank, as :func:`proxrl.core.masked_var` of the concatenation.

    ``var = sum m (x - mean)^2 / n`` with ``n = sum m`` over all ranks, times ``n / (n - 1)`` when
    ``unbiased`` (NaN for ``n <= 1``). Two all-reduces (global mean first, then the squared deviations from
    it: the same two-pass formula as the single-process function). Returns a 0-d tensor.
    """
    m = _weights(x, mask)
    total, weight, _ = _global_moments(x, mask)
    return _masked_var_from(x, m, total / weight, weight, unbiased)


def global_normalize(x: Tensor, mask: Tensor | None = None, eps: float = 1e-8, shift_mean: bool = True) -> Tensor:
    """Whiten ``x`` with statistics of the valid entries of ALL ranks: ``(x - mean) / (std + eps)``.

    Same result as :func:`proxrl.core.normalize` on the concatenated batch, rows returned for this rank only
    (advantage whitening over N ranks = whitening over the global batch). ``std`` is unbiased, taken as 0
    with a single valid entry; masked-out entries come back as 0.

    Args:
        x: this rank's share, any shape ``S``. mask: ``None`` or broadcastable to ``S`` (same number of dims).
        eps: added to the std. shift_mean: False only scales (``x / (std + eps)``).

    Returns:
        Tensor of shape ``S``.
    """
    m = _weights(x, mask)
    total, weight, count = _global_moments(x, mask)
    mean = total / weight
    std = _masked_var_from(x, m, mean, weight, unbiased=bool(count > 1)).sqrt()
    out = (x - mean) / (std + eps) if shift_mean else x / (std + eps)
    if mask is not None:
        out = torch.where(m != 0, out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor | None = None) -> float:
    """``1 - Var[R - V] / Var[R]`` over the entries of every rank, as :func:`proxrl.core.explained_variance`
    of the concatenation (biased variances, float64; NaN when ``Var[R] == 0``)."""
    return core_explained_variance(values, returns, mask, var_fn=masked_var)


def mean_over_ranks(metrics: Mapping[str, float], weight: float = 1.0) -> dict[str, float]:
    """Weighted mean of each metric over ranks, one all-reduce for the whole dict; NaN values are skipped.

    ``out[k] = sum_r w_r x_r[k] / sum_r w_r`` over the ranks whose ``x_r[k]`` is finite or inf (NaN means "no
    value here", e.g. an episodic return on a rank where no episode ended); NaN if no rank has a value.
    Every rank must pass the same keys. Use ``weight`` = the rank's count behind its value (episodes,
    tokens) for exact global means; the default weighs ranks equally (right for equal shares).
    """
    keys = list(metrics)
    if not _check_group():
        return {k: float(metrics[k]) for k in keys}
    vals = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
    has = ~torch.isnan(vals)
    w = torch.where(has, torch.full_like(vals, float(weight)), torch.zeros_like(vals))
    packed = torch.cat([torch.where(has, vals * w, torch.zeros_like(vals)), w])
    s = all_reduce_sum(packed)
    num, den = s[: len(keys)], s[len(keys):]
    return {k: (float(num[i] / den[i]) if den[i] > 0 else float("nan")) for i, k in enumerate(keys)}


def all_ranks_agree_stop(flag: bool) -> bool:
    """True on every rank if ANY rank passes True (one all-reduce of a max); for the target-KL early stop.

    Each rank evaluates ``proxrl.core.kl_early_stop`` on its own or, better, on the global ``approx_kl``
    (:func:`all_reduce_mean` of the minibatch KL); this vote makes sure all ranks stop at the same minibatch,
    so no rank waits in a gradient all-reduce the others skip.
    """
    if not _check_group():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


# ============================================================================================ work split


def shard_indices(n: int, rank: int, world_size: int, group_size: int = 1, what: str = "rollout") -> slice:
    """This rank's contiguous share ``[rank * n / W, (rank + 1) * n / W)`` of ``n`` samples, as a ``slice``.

    Samples come in contiguous groups of ``group_size`` (the GRPO/RLOO completions of one prompt); every
    group stays whole on one rank. Use as ``tensor[s]`` or ``items[s]``.

    Raises:
        UserError: (one line) ``world_size`` does not divide ``n``, or ``group_size`` does not divide ``n``,
            or ``world_size`` does not divide the number of groups ``n / group_size``.
        ValueError: ``rank`` outside ``[0, world_size)`` or non-positive sizes (a programming error).
    """
    if world_size < 1 or group_size < 1 or n < 1:
        raise ValueError(f"shard_indices needs n, world_size, group_size >= 1, got {n}, {world_size}, {group_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, {world_size})")
    if n % group_size:
        raise UserError(f"{what} of {n} samples is not a whole number of groups of {group_size}; "
                        f"make it a multiple of {group_size}")
    groups = n // group_size
    if groups % world_size:
        if group_size == 1:
            raise UserError(f"{what} of {n} samples cannot be split evenly over {world_size} processes; "
                            f"make it a multiple of {world_size} or run {_divisors_hint(n)} processes")
        raise UserError(f"{what} of {groups} groups of {group_size} cannot be split evenly over {world_size} "
                        f"processes (each group stays on one process); make the number of groups a multiple "
                        f"of {world_size} or run {_divisors_hint(groups)} processes")
    per = n // world_size
    return slice(rank * per, (rank + 1) * per)


def _divisors_hint(n: int) -> str:
    divs = [d for d in range(1, min(n, 64) + 1) if n % d == 0]
    return "/".join(str(d) for d in divs[:8])


def per_rank_seed(seed: int, rank: int) -> int:
    """The seed of ``rank``'s own streams (its envs, its sampling): ``seed`` itself on rank 0 (a 1-process run
    is unchanged), a 31-bit value derived from ``(seed, rank)`` with numpy's ``SeedSequence`` otherwise."""
    if rank == 0:
        return seed
    return int(np.random.SeedSequence([seed & (2**64 - 1), 0x5EED, rank]).generate_state(1)[0] & 0x7FFFFFFF)


# ============================================================================================ models


def wrap_ddp(module: torch.nn.Module, device: torch.device, **kwargs: Any) -> torch.nn.Module:
    """``DistributedDataParallel(module)`` when several processes run, ``module`` unchanged otherwise.

    DDP averages gradients over ranks during ``backward()`` (bucketed all-reduces overlapped with the
    backward pass), so each rank's loss must be the mean over ITS share of the minibatch and the shares must
    be equal for the result to equal the global-minibatch gradient. Use ``model.no_sync()`` on all but the
    last micro-batch of a gradient-accumulation loop. ``kwargs`` go to DDP (e.g.
    ``find_unused_parameters=True`` when some parameters get no gradient in a step).
    """
    if not is_distributed():
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, **kwargs)


def unwrap_model(module: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper (for saving and for calls that bypass ``forward``)."""
    from torch.nn.parallel import DistributedDataParallel

    return module.module if isinstance(module, DistributedDataParallel) else module


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a transformer: the entries of its longest ``nn.ModuleList`` whose entries all
    share one class (GPT-2's ``transformer.h``, Llama's ``model.layers``); ``[]`` if there is none."""
    best: list[torch.nn.Module] = []
    for mod in model.modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) > len(best):
            entries = list(mod)
            if entries and all(type(e) is type(entries[0]) for e in entries):
                best = entries
    return best


def fsdp_shard(model: torch.nn.Module, device: torch.device, bf16: bool = False,
               blocks: list[torch.nn.Module] | None = None) -> torch.nn.Module:
    """Shard ``model``'s parameters over all ranks with FSDP2 (``torch.distributed.fsdp.fully_shard``).

    Each transformer block (``blocks``, default :func:`transformer_blocks`) becomes one FSDP unit, then the
    root (embeddings, final norm, heads) another: a block's full parameters exist only while it runs (all-gather
    before its forward and backward, reduce-scatter of its gradients after). ``model`` is changed in place (its
    class becomes an FSDP subclass, its parameters DTensors sharded on dim 0) and returned; build the optimizer
    AFTER this call. Gradients are averaged over ranks like DDP's, so per-rank losses must be means over equal
    shares. With ``bf16`` on CUDA the mixed-precision policy computes in bf16 and reduces gradients in fp32
    (parameters and optimizer state stay fp32); on CPU ``bf16`` is ignored here (use :func:`autocast`).
    Save with :func:`full_state_dict` (rank 0 gets the whole model).

    Raises:
        UserError: fewer than 2 processes (``--fsdp`` needs torchrun).
    """
    require_distributed("--fsdp")
    if not is_distributed():
        raise RuntimeError("fsdp_shard needs the process group: call init_distributed() first")
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs: dict[str, Any] = {}
    if bf16 and device.type == "cuda":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in transformer_blocks(model) if blocks is None else blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def full_state_dict(model: torch.nn.Module) -> dict[str, Tensor]:
    """The whole model's state dict on CPU, for rank 0 to save (``from_pretrained``-compatible keys).

    Works for plain, DDP-wrapped and FSDP-sharded models alike. Collective for FSDP: every rank must call it;
    ranks other than 0 get ``{}`` for a sharded model (don't save there anyway).
    """
    from torch.distributed.fsdp import FSDPModule

    model = unwrap_model(model)
    if not any(isinstance(m, FSDPModule) for m in model.modules()):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(model: torch.nn.Module, state: Mapping[str, Tensor]) -> None:
    """Load a whole-model state dict (as :func:`full_state_dict` returns) into a plain, DDP or FSDP model.

    For FSDP only rank 0 needs ``state`` (other ranks may pass ``{}``): rank 0's tensors are broadcast and
    each rank keeps its shard, so a checkpoint saved with N processes loads with any M. Strict about keys.
    """
    from torch.distributed.fsdp import FSDPModule

    model = unwrap_model(model)
    if not any(isinstance(m, FSDPModule) for m in model.modules()):
        model.load_state_dict(dict(state), strict=True)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, dict(state),
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True))


# ============================================================================================ failure


_SOURCE_PREFIX = re.compile(r"^\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*")
_PEER_LOST = ("connection reset", "connection closed", "timed out", "timeout", "broken pipe", "nccl")


def _peer_lost(e: BaseException, msg: str) -> bool:
    """True for a collective that failed because another rank vanished or stalled (gloo/NCCL errors)."""
    dist_error = getattr(torch.distributed, "DistError", None)
    if dist_error is not None and isinstance(e, dist_error):
        return True
    return isinstance(e, RuntimeError) and any(k in msg.lower() for k in _PEER_LOST)


def _one_line(e: BaseException) -> str:
    """The cause of a rank's failure on one line (at most ~400 characters of the exception's message)."""
    if isinstance(e, KeyboardInterrupt):
        return "interrupted"
    if isinstance(e, _StoppedByLauncher):
        return ("stopped by the launcher (SIGTERM): another rank ended first, or the job was cancelled; if no rank "
                "reported an error, one was killed (e.g. by the out-of-memory killer) or crashed, and the "
                "launcher's summary names it")
    if isinstance(e, SystemExit):
        return " ".join(str(e.code).split())
    msg = _SOURCE_PREFIX.sub("", " ".join(str(e).split()))
    if len(msg) > 400:
        msg = msg[:397] + "..."
    if isinstance(e, UserError):
        return msg or type(e).__name__
    text = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
    if _peer_lost(e, msg):
        text = (f"lost contact with another rank (killed, crashed, or stuck for over {TIMEOUT_ENV}="
                f"{_timeout_s_or_default():g} s; the launcher's summary names it): {text}")
    return text


def _timeout_s_or_default() -> float:
    try:
        return _timeout_s()
    except UserError:
        return DEFAULT_TIMEOUT_S


def _exit_code(e: BaseException) -> int:
    if isinstance(e, UserError):
        return int(e.exit_code)
    if isinstance(e, KeyboardInterrupt):
        return 130
    if isinstance(e, SystemExit):
        return e.code if isinstance(e.code, int) else 1
    return 1


def _claim_report() -> bool:
    """True if no other rank has reported a failure yet (first to add to the shared store); True when the
    store cannot be reached (better two lines than none)."""
    if not _initialized():
        return True
    try:
        store = torch.distributed.distributed_c10d._get_default_store()
        store.set_timeout(datetime.timedelta(seconds=2))
        return int(store.add(_FAILED_KEY, 1)) == 1
    except Exception:  # noqa: BLE001  the store's host may be the rank that died
        return True


class _StoppedByLauncher(BaseException):
    """SIGTERM under torchrun, raised by :func:`fail_fast`'s handler so that the rank can say why it ends."""


_reporting = False  # set once a rank has started to report its failure (a SIGTERM then ends it at once)


def _on_sigterm(signum: int, frame: Any) -> None:
    if _reporting:  # already on its way out: end now, as the signal would have
        _end_by_sigterm()
    raise _StoppedByLauncher()


def _end_by_sigterm() -> None:
    """End this process by SIGTERM's default action (its exit status then reads as the signal, as torchrun expects)."""
    sys.stdout.flush()
    sys.stderr.flush()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)  # the signal is delivered at once; never fall through
    os._exit(128 + signal.SIGTERM)


def _report_and_exit(e: BaseException, debug: bool) -> None:
    global _reporting
    _reporting = True
    info = dist_info()
    code = _exit_code(e)
    stopped = isinstance(e, _StoppedByLauncher)
    if not info.is_main and not stopped:
        time.sleep(_REPORT_GRACE_S)  # let rank 0 report a failure every rank shares
    first = _claim_report()
    if first:
        if debug and not stopped:
            traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)
        print(f"error: rank {info.rank}: {_one_line(e)}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    if stopped:
        _end_by_sigterm()
    if not first and os.environ.get("TORCHELASTIC_RUN_ID"):
        # A consequence of another rank's failure (e.g. its socket closed under our collective): let torchrun,
        # which is already tearing the job down, terminate us, so its summary names the failing rank alone.
        time.sleep(min(_timeout_s_or_default(), 30.0))
    # no destroy_process_group: it can block on a peer stuck in a collective; the OS closes the sockets
    os._exit(code if code != 0 else 1)


def _debug_env() -> bool:
    return os.environ.get("PROXRL_DEBUG", "") not in ("", "0")


@contextlib.contextmanager
def fail_fast(debug: bool | None = None) -> Iterator[None]:
    """Context for a rank's whole job: with several processes, an exception inside ends THIS process at once.

    The failing rank prints ``error: rank R: <cause>`` (one line; the traceback before it only with
    ``debug``, default ``PROXRL_DEBUG=1``) and calls ``os._exit(code)`` (the UserError's exit code, 130 for
    Ctrl-C, else 1); torchrun sees the non-zero exit and terminates the other ranks. The line is printed
    once per job: the first rank to report claims it in the process group's store, and a non-main rank waits
    1.5 s first so that a failure every rank shares (bad input) is reported by rank 0. ``SystemExit(0)``
    passes through; ``sys.exit(n)`` with a non-zero int exits with ``n`` without a line (its caller, e.g.
    argparse, printed the reason); ``sys.exit("text")`` reports ``text``. Under torchrun, a SIGTERM (torchrun
    stops every rank once one has ended) is reported the same way, so a rank that was killed without a word
    (e.g. by the out-of-memory killer) still gets one line from another. With one process the context does
    nothing: exceptions propagate to the caller (the CLI prints them as today).
    """
    if _env_info().world_size <= 1:
        yield
        return
    previous = None
    if os.environ.get("TORCHELASTIC_RUN_ID") and threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    except SystemExit as e:
        if e.code in (0, None):
            raise
        if not isinstance(e.code, str):  # sys.exit(2) after its caller printed the reason (e.g. argparse)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(int(e.code) if isinstance(e.code, int) else 1)
        _report_and_exit(e, _debug_env() if debug is None else debug)
    except BaseException as e:  # noqa: BLE001  every failure must end the job, Ctrl-C included
        _report_and_exit(e, _debug_env() if debug is None else debug)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def run_main(fn: Callable[..., T], *args: Any, debug: bool | None = None, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` inside :func:`fail_fast`; on success the process group is destroyed.

    The CLI calls ``run_main(command, args)`` so that under torchrun a raising rank ends the job with one line.
    """
    with fail_fast(debug):
        out = fn(*args, **kwargs)
    shutdown()
    return out
