"""The layering rules of proxrl (README's layout section): checked on the import graph, statically and at runtime.

* ``proxrl.core``: torch / numpy / stdlib only, nothing of proxrl outside itself.
* ``proxrl.runs``: nothing of proxrl except itself and ``proxrl.errors``.
* ``proxrl.control`` never imports ``proxrl.lm`` and vice versa.
"""
from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _py_files(subpackage: str, root: Path = ROOT) -> list[Path]:
    d = root / "proxrl" / subpackage
    files = sorted(d.rglob("*.py")) if d.is_dir() else []
    assert files, f"proxrl/{subpackage} has no Python files: the layering rule would check nothing"
    return files


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, root: Path = ROOT) -> set[str]:
    """Absolute names of every module imported anywhere in ``path`` (relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    module = _module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base)
                target = f"{prefix}.{node.module}" if node.module else prefix
            else:
                target = node.module or ""
            names.add(target)
            # `from proxrl import lm` imports proxrl.lm
            names.update(f"{target}.{alias.name}" for alias in node.names if alias.name != "*")
    return names


def _violations(subpackage: str, allowed, root: Path = ROOT) -> list[str]:
    bad = []
    for path in _py_files(subpackage, root):
        for name in sorted(imported_modules(path, root)):
            if (name == "proxrl" or name.startswith("proxrl.")) and not allowed(name):
                bad.append(f"{path.relative_to(root)} imports {name}")
    return bad


def _within(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_checker_catches_violations(tmp_path):
    # guards the checker itself on a fake tree: relative, absolute and `from proxrl import x` forms
    core = tmp_path / "proxrl" / "core"
    control = tmp_path / "proxrl" / "control"
    core.mkdir(parents=True)
    control.mkdir(parents=True)
    (core / "__init__.py").write_text("from . import advantages\nfrom .losses import policy_loss\n")
    (core / "bad.py").write_text("import torch\nfrom ..runs import RunDir\n")
    (control / "train.py").write_text("from proxrl import lm\nfrom proxrl.core import gae\n")
    assert _violations("core", lambda n: _within(n, "proxrl.core"), tmp_path) == [
        "proxrl/core/bad.py imports proxrl.runs",
        "proxrl/core/bad.py imports proxrl.runs.RunDir",
    ]
    assert _violations("control", lambda n: not _within(n, "proxrl.lm"), tmp_path) == [
        "proxrl/control/train.py imports proxrl.lm"
    ]
    assert _within("proxrl.lm.ppo", "proxrl.lm") and not _within("proxrl.lmx", "proxrl.lm")


def test_core_imports_nothing_of_proxrl():
    # objects imported via `from proxrl.core.x import name` show up as proxrl.core.x.name: still inside core
    assert _violations("core", lambda n: _within(n, "proxrl.core")) == []


def test_core_imports_only_torch_numpy_stdlib():
    allowed_roots = set(sys.stdlib_module_names) | {"torch", "numpy", "proxrl"}
    bad = []
    for path in _py_files("core"):
        for name in imported_modules(path):
            if name.split(".")[0] not in allowed_roots:
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert bad == []


def test_runs_imports_only_errors():
    assert _violations("runs", lambda n: _within(n, "proxrl.runs", "proxrl.errors")) == []


def test_control_never_imports_lm():
    assert _violations("control", lambda n: not _within(n, "proxrl.lm")) == []


def test_lm_never_imports_control():
    assert _violations("lm", lambda n: not _within(n, "proxrl.control")) == []


def test_import_core_is_light():
    code = (
        "import sys, json; import proxrl.core; "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('transformers', 'gymnasium', 'tokenizers', 'peft') or m.startswith(('proxrl.control', 'proxrl.lm', "
        "'proxrl.runs')))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_theory_doc_references_exist():
    """docs/theory.md places each equation beside `path.py::name` references; they must not rot."""
    doc = ROOT / "docs" / "theory.md"
    assert doc.is_file(), "docs/theory.md is missing"
    refs = set(re.findall(r"`((?:tests|proxrl)/[\w/]+\.py)::(\w+)`", doc.read_text(encoding="utf-8")))
    assert refs, "no references found"
    missing = []
    for rel, name in sorted(refs):
        path = ROOT / rel
        if not path.exists():
            missing.append(rel)
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        defined = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        if name not in defined:
            missing.append(f"{rel}::{name}")
    assert missing == []
