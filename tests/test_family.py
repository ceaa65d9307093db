"""The scripts' common blocks are byte-identical (so that `diff parent child` is the algorithm), the common
Args fields come first in the same order, and every script imports nothing from the repository but model."""
import ast
import dataclasses
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ["sft.py", "rejection_sampling.py", "dpo.py", "reinforce.py", "grpo.py", "grape.py", "ppo.py", "trpo.py"]
PRESENT = [s for s in SCRIPTS if (ROOT / s).exists()]
SAMPLERS = [s for s in PRESENT if s != "sft.py"]  # every script that samples has the rollout block


def section(text, title):
    """The lines from the `# <title>` section header to the next section rule."""
    m = re.search(rf"^# {re.escape(title)}.*?(?=^# -{{20,}})", text, flags=re.M | re.S)
    assert m, f"no section '# {title}'"
    return m.group(0)


def function_source(text, name):
    tree = ast.parse(text)
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    return ast.get_source_segment(text, node)


@pytest.mark.parametrize("script", PRESENT)
def test_task_and_shared_blocks_identical(script):
    ref, text = (ROOT / "sft.py").read_text(), (ROOT / script).read_text()
    for title in ("Task", "Shared machinery"):
        assert section(text, title) == section(ref, title), f"{script}: the '{title}' block differs from sft.py's"
    assert function_source(text, "parse_args") == function_source(ref, "parse_args")


@pytest.mark.parametrize("script", SAMPLERS)
def test_rollout_block_identical(script):
    ref = section((ROOT / "reinforce.py").read_text(), "Rollouts")
    assert section((ROOT / script).read_text(), "Rollouts") == ref, f"{script}: the 'Rollouts' block differs"


@pytest.mark.parametrize("script", PRESENT)
def test_common_args_first_in_the_same_order(script):
    common = [f.name for f in dataclasses.fields(importlib.import_module("sft").Args)]
    fields = [f.name for f in dataclasses.fields(importlib.import_module(script[:-3]).Args)]
    assert fields[:len(common)] == common


@pytest.mark.parametrize("script", PRESENT)
def test_imports_only_model_from_the_repo(script):
    local = {p.stem for p in ROOT.glob("*.py")}
    tree = ast.parse((ROOT / script).read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert names & local <= {"model"}


@pytest.mark.parametrize("script", PRESENT + ["model.py"])
def test_no_eval_exec_and_safe_torch_load(script):
    text = (ROOT / script).read_text()
    calls = {n.func.id for n in ast.walk(ast.parse(text)) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert not calls & {"eval", "exec"}
    for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
        assert "weights_only=True" in m.group(1), f"{script}: {m.group(0)}"
