"""The layout of docs/architecture.md, held against the code: every import (lazy ones inside functions
included) runs down the floors, the model files import nothing from support/, and the reading path
stays short enough to read."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent

FLOORS = {  # as docs/architecture.md draws them
    "repmixer": 0, "qwen2": 0,
    "fastvlm": 1, "support.checkpoint": 1, "support.tokenizer": 1,
    "support.speedups": 2, "support.adapters": 2,
    "support.loading": 3, "support.chat": 3,
    "support.options": 4,
    "support.batch": 5, "support.llava_data": 5, "support.serving": 5,
    "support.training": 6,
    "infer": 7, "train": 7, "serve": 7,
}
READING_PATH = ("repmixer.py", "qwen2.py", "fastvlm.py", "train.py", "infer.py")


def module_name(path):
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def project_imports(path):
    """The project modules `path` imports, anywhere in the file: {module: line}."""
    found = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name in FLOORS:
                found.setdefault(name, node.lineno)
    return found


def test_every_project_file_has_a_floor():
    files = {module_name(p) for p in list(ROOT.glob("*.py")) + list((ROOT / "support").glob("*.py"))}
    assert files - {"support.__init__"} == set(FLOORS)


@pytest.mark.parametrize("module", sorted(FLOORS))
def test_imports_run_down_the_floors(module):
    path = ROOT / (module.replace(".", "/") + ".py")
    up = {name: line for name, line in project_imports(path).items() if FLOORS[name] >= FLOORS[module]}
    assert not up, f"{path.name} imports {up} (name: line) on its own floor or above"


def test_the_model_files_import_nothing_from_support():
    for name in ("repmixer.py", "qwen2.py", "fastvlm.py"):
        text = (ROOT / name).read_text()
        assert "support" not in {n.split(".")[0] for n in project_imports(ROOT / name)} and "import support" not in text


def test_the_reading_path_is_short_enough_to_read():
    """At most 550 lines a file and 1,700 together (docs/architecture.md)."""
    lines = {name: len((ROOT / name).read_text().splitlines()) for name in READING_PATH}
    assert max(lines.values()) <= 550 and sum(lines.values()) <= 1700, lines


def test_only_serve_py_imports_the_web_stack():
    """starlette and uvicorn are serve.py's own (requirements-serve.txt): infer.py and train.py run without them."""
    for path in list(ROOT.glob("*.py")) + list((ROOT / "support").glob("*.py")):
        tree = ast.parse(path.read_text())
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names} | \
                {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        if path.name != "serve.py":
            assert not names & {"starlette", "uvicorn", "fastapi"}, path
