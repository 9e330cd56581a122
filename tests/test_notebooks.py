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


TIME = re.compile(r"\d+(?:\.\d+)? ?(?:ms|s)\b")                # wall-clock timings: differ per machine
TEMP = re.compile(r"/tmp/\w+")                                      # temporary folders
ROUNDING = re.compile(r"\d\.\d+e-(\d\d)")                          # float rounding errors, e.g. 5.7e-07
DECIMAL = re.compile(r"\d+\.\d+")


def stable_lines(text):
    """Every non-empty printed line, with timings (and every decimal on a line that prints a timing),
    temporary paths and rounding errors masked.

    What remains are shapes, parameter and token counts, tables, answers and losses: numbers the code
    computes identically on any machine. A rounding error must stay below 1e-4 (its exponent is
    checked); its digits may differ."""
    lines = []
    for line in text.splitlines():
        if not line.strip():
            continue
        for exponent in ROUNDING.findall(line):
            assert int(exponent) >= 5, f"an error of 1e-{exponent} printed: {line!r}"
        line = ROUNDING.sub("<rounding>", TEMP.sub("<tmp>", line))
        if TIME.search(line):                                 # a timing line: its other decimals are times too
            line = DECIMAL.sub("<time>", TIME.sub("<time>", line))
        lines.append(line)
    return lines


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_and_matches_its_committed_numbers(path):
    """Executed afresh, a notebook prints every line its committed outputs print (timings, temporary
    paths and rounding errors masked), so the numbers a reader sees are the ones the code computes."""
    committed = stable_lines(text_of(nbformat.read(path, as_version=4)))
    fresh_nb = execute(path)                                  # any failing cell raises here
    assert not any(o.get("output_type") == "error" for c in fresh_nb.cells if c.cell_type == "code"
                   for o in c.outputs)
    fresh = stable_lines(text_of(fresh_nb))
    numbers = [line for line in committed if re.search(r"\d", line)]
    assert len(numbers) >= 5, f"{path.name} prints too few numbers for this check to mean anything"
    assert fresh == committed


def test_notebook_1_prints_the_token_table_the_code_computes():
    text = text_of(nbformat.read(NOTEBOOKS[0], as_version=4))
    for side in (256, 512, 768, 1024):
        tokens, vit = R.FASTVITHD.num_tokens(side), (side // 14) ** 2
        assert f"| {side} | {tokens} | {vit} |" in text
    assert "| total | 122,714,208 |" in text
    for i, (c, stride) in enumerate(zip(R.FASTVITHD.widths, (4, 8, 16, 32, 64))):
        assert re.search(rf"stage {i + 1} .*\({c}, {1024 // stride}, {1024 // stride}\)\n", text)
