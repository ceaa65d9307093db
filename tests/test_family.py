"""The scripts' shape (DESIGN.md): the algorithm first, main() next, then, below one marker line, the blocks that are
byte-identical in every script (so that `diff parent child` is the algorithm); the common Args fields first in the same
order; nothing imported from the repository but model; lines of at most 120 characters."""
import ast
import dataclasses
import importlib
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ["sft.py", "rejection_sampling.py", "dpo.py", "reinforce.py", "grpo.py", "grape.py", "ppo.py", "trpo.py"]
PRESENT = [s for s in SCRIPTS if (ROOT / s).exists()]
RL = ["reinforce.py", "grpo.py", "grape.py", "ppo.py", "trpo.py"]  # and these the RL step's metrics
MARKER = "# Everything below this line is the same, byte for byte, in every script"


def split(text):
    """(above, below) the marker line."""
    assert text.count(MARKER) == 1, "no marker line (or more than one)"
    i = text.index(MARKER)
    return text[:i], text[i:]


def section(text, title):
    """The lines from the `# <title>` section header to the next section rule."""
    m = re.search(rf"^# {re.escape(title)}.*?(?=^# -{{20,}})", text, flags=re.M | re.S)
    assert m, f"no section '# {title}'"
    return m.group(0)


def functions(text):
    """{name: (first line, source)} of the top-level functions and classes."""
    tree = ast.parse(text)
    return {n.name: (n.lineno, ast.get_source_segment(text, n)) for n in tree.body
            if isinstance(n, (ast.FunctionDef, ast.ClassDef))}


@pytest.mark.parametrize("script", PRESENT)
def test_reading_order(script):
    """docstring, imports, Args, the algorithm's functions (the first before line 200), main(), the marker, then
    only the shared blocks and the `if __name__ == "__main__"` line."""
    text = (ROOT / script).read_text()
    above, below = split(text)
    defs = functions(text)
    marker_line = above.count("\n") + 1
    assert list(defs)[0] == "Args" and defs["main"][0] < marker_line
    own = [line for name, (line, _) in defs.items() if name not in ("Args", "main") and line < marker_line]
    assert own and min(own) < 200 and max(own) < defs["main"][0], "the algorithm's functions come before main()"
    assert text.rstrip().endswith('if __name__ == "__main__":\n    main()')


@pytest.mark.parametrize("script", PRESENT)
def test_task_and_shared_blocks_identical(script):
    ref, text = split((ROOT / "sft.py").read_text())[1], split((ROOT / script).read_text())[1]
    for title in ("Task", "Shared machinery"):
        assert section(text, title) == section(ref, title), f"{script}: the '{title}' block differs from sft.py's"


def test_every_shared_function_has_one_text():
    """A function below the marker has the same source in every script that defines it; rollout() (which evaluate()
    uses too) is in every script and rl_metrics() in every RL script; nothing above the marker is shared by 3+
    scripts."""
    below = {s: functions(split((ROOT / s).read_text())[1]) for s in PRESENT}
    above = {s: functions(split((ROOT / s).read_text())[0]) for s in PRESENT}
    texts = {}
    for s, defs in below.items():
        for name, (_, src) in defs.items():
            texts.setdefault(name, set()).add(src)
    assert {name for name, srcs in texts.items() if len(srcs) > 1} == set()
    assert all("rollout" in below[s] for s in PRESENT) and all("rl_metrics" in below[s] for s in RL if s in PRESENT)
    copies = {}
    for s, defs in above.items():
        for name, (_, src) in defs.items():
            if name not in ("Args", "main"):
                copies.setdefault(src, []).append(s)
    assert [v for v in copies.values() if len(v) >= 3] == []


@pytest.mark.parametrize("script", PRESENT)
def test_no_dead_functions(script):
    """Every function of a script is called (or used) somewhere in it."""
    text = (ROOT / script).read_text()
    for name in functions(text):
        if name not in ("Args", "main"):
            assert len(re.findall(rf"\b{name}\b", text)) >= 2, f"{script}: {name} is never used"


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


def test_no_line_over_120_characters():
    long = [f"{p.relative_to(ROOT)}:{i}" for p in sorted(ROOT.rglob("*.py"))
            if not any(part.startswith(".") for part in p.relative_to(ROOT).parts)  # .venv, .git, ...
            for i, line in enumerate(p.read_text().splitlines(), 1) if len(line) > 120]
    assert long == []


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed (requirements-dev.txt)")
def test_ruff():
    """The linter configured in ruff.toml (line length, unused imports and variables, undefined names)."""
    out = subprocess.run(["ruff", "check", "--no-cache", str(ROOT)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
