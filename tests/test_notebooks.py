"""The notebooks run top to bottom, and the numbers they print are the ones the modules compute."""

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

import repmixer as R

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def test_all_five_notebooks_are_there():
    assert [p.name[:2] for p in NOTEBOOKS] == ["1_", "2_", "3_", "4_", "5_"]


def execute(path):
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    return nb


def text_of(nb):
    return "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_and_matches_its_committed_numbers(path):
    committed = nbformat.read(path, as_version=4)
    fresh = execute(path)                                   # any failing cell raises here
    assert not any(o.get("output_type") == "error" for c in fresh.cells if c.cell_type == "code" for o in c.outputs)
    # shapes, counts and tables (not timings) printed by the committed notebook are printed again
    stable = re.compile(r"^\| (?:\d+|stem|stage \d|expansion|total) \|.*\|$|^\w[\w ]* +\(\d+, \d+, \d+\)", re.M)
    assert stable.findall(text_of(committed)) == stable.findall(text_of(fresh))


def test_notebook_1_prints_the_token_table_the_code_computes():
    text = text_of(nbformat.read(NOTEBOOKS[0], as_version=4))
    for side in (256, 512, 768, 1024):
        tokens, vit = R.FASTVITHD.num_tokens(side), (side // 14) ** 2
        assert f"| {side} | {tokens} | {vit} |" in text
    assert "| total | 122,714,208 |" in text
    for i, (c, stride) in enumerate(zip(R.FASTVITHD.widths, (4, 8, 16, 32, 64))):
        assert re.search(rf"stage {i + 1} .*\({c}, {1024 // stride}, {1024 // stride}\)\n", text)
