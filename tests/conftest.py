"""Shared test settings: offline Hugging Face, and one torch thread per test (restored afterwards).

On a shared 2-core machine several threads per process only add contention for these tiny models.
"""
import os
import sys
from contextlib import contextmanager

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@contextmanager
def importable_module(tmp_path, prefix: str, source: str):
    """Write ``source`` as a module in ``tmp_path`` (named ``prefix`` + the test's dir name), make it importable
    (e.g. for ``proxrl train MODULE:factory``) and yield its name; removed from ``sys.path``/``sys.modules`` after."""
    name = f"{prefix}_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(source)
    sys.path.insert(0, str(tmp_path))
    try:
        yield name
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop(name, None)
