"""Save and restore random number generator state exactly, in a checkpoint-friendly form.

:func:`rng_state` returns ``(tensors, state)``: the large state arrays as tensors (safetensors-able, keys
prefixed ``rng.``) and the small scalars as a JSON-able dict. Merge the tensors into a checkpoint's
tensors and store the dict under e.g. ``state["rng"]``; :func:`set_rng_state` takes them back.
"""
from __future__ import annotations

import base64
import random
import warnings
from typing import Any

import numpy as np
import torch

_PY = "rng.python"
_NP = "rng.numpy"
_TORCH = "rng.torch_cpu"
_CUDA = "rng.torch_cuda."


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Global RNG state of python ``random``, numpy's legacy global RNG, torch CPU (and CUDA if in use).

    Returns ``(tensors, state)``: tensors ``rng.python`` (625,) int64, ``rng.numpy`` (624,) int64,
    ``rng.torch_cpu`` (N,) uint8, ``rng.torch_cuda.<i>`` (N,) uint8 per initialised CUDA device;
    ``state`` holds the scalar parts (JSON-able).
    """
    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    tensors = {
        _PY: torch.tensor(py_internal, dtype=torch.int64),
        _NP: torch.from_numpy(np.asarray(np_keys, dtype=np.int64).copy()),
        _TORCH: torch.get_rng_state().clone(),
    }
    cuda_devices = 0
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"{_CUDA}{i}"] = s.clone()
        cuda_devices = torch.cuda.device_count()
    state = {
        "python": {"version": py_version, "gauss_next": py_gauss},
        "numpy": {"name": np_name, "pos": int(np_pos), "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "cuda_devices": cuda_devices,
    }
    return tensors, state


def set_rng_state(tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    """Restore the global RNG state saved by :func:`rng_state`.

    ``tensors`` may be a whole checkpoint's tensors (only ``rng.*`` keys are read); ``state`` is the dict
    returned by :func:`rng_state`, or a checkpoint state holding it under ``"rng"``.
    """
    if "python" not in state and isinstance(state.get("rng"), dict):
        state = state["rng"]
    missing = [k for k in (_PY, _NP, _TORCH) if k not in tensors]
    if missing or "python" not in state or "numpy" not in state:
        raise KeyError(f"RNG state incomplete: missing tensors {missing} or state keys python/numpy")
    py = state["python"]
    internal = tuple(int(v) for v in tensors[_PY].tolist())
    gauss = py["gauss_next"]
    random.setstate((int(py["version"]), internal, None if gauss is None else float(gauss)))
    n = state["numpy"]
    keys = tensors[_NP].numpy().astype(np.uint32)
    np.random.set_state((n["name"], keys, int(n["pos"]), int(n["has_gauss"]), float(n["cached_gaussian"])))
    torch.set_rng_state(tensors[_TORCH].to(dtype=torch.uint8, device="cpu").contiguous())
    cuda = sorted((k for k in tensors if k.startswith(_CUDA)), key=lambda k: int(k[len(_CUDA):]))
    if cuda:
        if torch.cuda.is_available() and torch.cuda.device_count() >= len(cuda):
            torch.cuda.set_rng_state_all([tensors[k].to(dtype=torch.uint8, device="cpu") for k in cuda])
        else:
            warnings.warn(f"checkpoint holds CUDA RNG state for {len(cuda)} device(s) but fewer are available; not restored",
                          stacklevel=2)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _from_jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        if "__ndarray__" in obj:
            return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
        return {k: _from_jsonable(v) for k, v in obj.items()}
    return obj


def generator_state(gen: torch.Generator | np.random.Generator | np.random.RandomState) -> dict[str, Any]:
    """JSON-able state of an explicit generator (torch.Generator, np.random.Generator or RandomState).

    Big integers (PCG64's 128-bit state) stay Python ints, which ``json`` writes and reads exactly.
    """
    if isinstance(gen, torch.Generator):
        raw = gen.get_state().cpu().numpy().tobytes()
        return {"kind": "torch", "device": str(gen.device), "state": base64.b64encode(raw).decode("ascii")}
    if isinstance(gen, np.random.Generator):
        return {"kind": "numpy", "state": _jsonable(gen.bit_generator.state)}
    if isinstance(gen, np.random.RandomState):
        return {"kind": "numpy_legacy", "state": _jsonable(gen.get_state(legacy=False))}
    raise TypeError(f"unsupported generator type {type(gen).__name__}")


def set_generator_state(gen: torch.Generator | np.random.Generator | np.random.RandomState, state: dict[str, Any]) -> None:
    """Restore a generator in place from :func:`generator_state` output (same generator kind)."""
    kind = state.get("kind")
    if isinstance(gen, torch.Generator) and kind == "torch":
        raw = np.frombuffer(base64.b64decode(state["state"]), dtype=np.uint8).copy()
        gen.set_state(torch.from_numpy(raw))
    elif isinstance(gen, np.random.Generator) and kind == "numpy":
        gen.bit_generator.state = _from_jsonable(state["state"])
    elif isinstance(gen, np.random.RandomState) and kind == "numpy_legacy":
        gen.set_state(_from_jsonable(state["state"]))
    else:
        raise TypeError(f"cannot restore a {kind!r} generator state into a {type(gen).__name__}")
