"""docs/rlhf.md stays true to the code: every `path.py::name` it cites exists, and every `--flag` in a
`proxrl ppo|sft|reward-model|generate` command of the tutorial is a real option.

Static checks (ast / regex over source files, and the light config modules, which import no torch): no model
loading.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib
import re
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "rlhf.md"

REF = re.compile(r"`((?:proxrl|tests)/[\w/]+\.py)::([\w.]+)`")

# subcommand -> (light module holding the config dataclass, dataclass name)
CONFIGS = {
    "ppo": ("proxrl.lm.ppo_config", "PPOConfig"),
    "sft": ("proxrl.lm.supervised_config", "SFTConfig"),
    "reward-model": ("proxrl.lm.supervised_config", "RewardModelConfig"),
}


def _doc() -> str:
    return DOC.read_text(encoding="utf-8")


@lru_cache(maxsize=None)
def _tree(rel: str) -> ast.Module:
    return ast.parse((ROOT / rel).read_text(encoding="utf-8"))


def _defined(tree: ast.Module, dotted: str) -> bool:
    """True if ``dotted`` ("f", "Cls" or "Cls.method") is a def/class (or assignment) at module level."""
    body: list[ast.stmt] = tree.body
    for part in dotted.split("."):
        found = None
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == part:
                found = node
                break
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == part for t in targets):
                    found = node
                    break
        if found is None:
            return False
        body = getattr(found, "body", [])
    return True


def _references() -> list[tuple[str, str]]:
    return sorted(set(REF.findall(_doc())))


def test_doc_exists_and_cites_code_and_tests():
    refs = _references()
    assert any(p.startswith("proxrl/") for p, _ in refs)
    assert any(p.startswith("tests/") for p, _ in refs)
    assert len(refs) >= 40, len(refs)


@pytest.mark.parametrize("path,name", _references())
def test_cited_name_exists(path, name):
    f = ROOT / path
    assert f.is_file(), f"docs/rlhf.md cites {path}, which does not exist"
    if path.startswith("tests/"):
        assert re.search(rf"^def {re.escape(name)}\(", f.read_text(encoding="utf-8"), re.M), \
            f"docs/rlhf.md cites {path}::{name}, but no `def {name}(` is in that file"
    else:
        assert _defined(_tree(path), name), f"docs/rlhf.md cites {path}::{name}, which is not defined there"


# ------------------------------------------------------------------------------------------------ flags


def _config_flags(sub: str) -> set[str]:
    module, cls_name = CONFIGS[sub]
    cls = getattr(importlib.import_module(module), cls_name)
    return {"--" + f.name.replace("_", "-") for f in dataclasses.fields(cls)}


def _cli_flags(sub: str) -> set[str]:
    """Flags added by hand in proxrl/cli.py to subcommand ``sub`` (e.g. ppo's --resume), plus --config/--help."""
    src = (ROOT / "proxrl" / "cli.py").read_text(encoding="utf-8")
    flags = {"--config", "--help"}
    # each `p = add("name", ...)` block runs until the next `add(`
    blocks = re.split(r"\n\s*(?:p = )?add\(", src)
    for block in blocks:
        if block.startswith(f'"{sub}"'):
            flags |= set(re.findall(r'add_argument\("(--[\w-]+)"', block))
    return flags


def _commands() -> list[tuple[str, str]]:
    """(subcommand, full command text) for every `proxrl SUB ...` command in the doc (continuations joined)."""
    text = _doc().replace("\\\n", " ")
    out = []
    for m in re.finditer(r"proxrl (ppo|sft|reward-model|generate)\b([^\n`]*)", text):
        out.append((m.group(1), m.group(2)))
    return out


def test_tutorial_has_commands():
    subs = {s for s, _ in _commands()}
    assert {"ppo", "sft", "reward-model", "generate"} <= subs, subs


@pytest.mark.parametrize("sub", ["ppo", "sft", "reward-model", "generate"])
def test_tutorial_flags_exist(sub):
    allowed = _cli_flags(sub)
    if sub in CONFIGS:
        allowed |= _config_flags(sub)
    used = set()
    for s, cmd in _commands():
        if s == sub:
            used |= set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", cmd))
    assert used, f"no flags found for proxrl {sub}"
    unknown = sorted(used - allowed)
    assert not unknown, f"docs/rlhf.md uses `proxrl {sub}` flags that do not exist: {unknown}"


def test_flags_named_in_prose_exist():
    """Every `--flag` written anywhere in the doc is an option of some LM subcommand."""
    allowed = set().union(*(_config_flags(s) for s in CONFIGS), *(_cli_flags(s) for s in (*CONFIGS, "generate")))
    used = set(re.findall(r"`(--[a-z][\w-]*)", _doc()))
    unknown = sorted(used - allowed)
    assert not unknown, f"docs/rlhf.md names options that do not exist: {unknown}"


def test_config_modules_import_no_torch():
    """``proxrl ppo|sft|reward-model|demo --help`` build their flags from these modules: they must stay light."""
    modules = sorted({m for m, _ in CONFIGS.values()} | {"proxrl.lm.demo_config"})
    heavy = "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    code = f"import sys; import {', '.join(modules)}; {heavy}"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
