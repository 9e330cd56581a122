"""The notebooks run top to bottom, and the numbers they print are the ones the modules compute."""

import os
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

import repmixer as R

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def test_all_six_notebooks_are_there():
    assert [p.name[:2] for p in NOTEBOOKS] == ["1_", "2_", "3_", "4_", "5_", "6_"]


def execute(path):
    """Run a notebook in a fresh kernel. NOTEBOOK_QUICK=1 asks notebooks that measure at full shapes
    for minutes (notebook 6) for a reduced set; their committed outputs are a full run."""
    nb = nbformat.read(path, as_version=4)
    before = os.environ.get("NOTEBOOK_QUICK")
    os.environ["NOTEBOOK_QUICK"] = "1"
    try:
        NotebookClient(nb, timeout=600, kernel_name="python3",
                       resources={"metadata": {"path": str(path.parent)}}).execute()
    finally:
        if before is None:
            del os.environ["NOTEBOOK_QUICK"]
        else:
            os.environ["NOTEBOOK_QUICK"] = before
    return nb


def is_quick_aware(nb):
    return any("NOTEBOOK_QUICK" in c.source for c in nb.cells if c.cell_type == "code")


def images_of(nb):
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]


def text_of(nb):
    return "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)


TIME = re.compile(r"\d+(?:\.\d+)? ?(?:ms|s)\b")                # wall-clock timings: differ per machine
TEMP = re.compile(r"/tmp/\w+")                                      # temporary folders
ROUNDING = re.compile(r"\d\.\d+e-(\d\d)")                          # float rounding errors, e.g. 5.7e-07
DECIMAL = re.compile(r"\d+\.\d+")


def stable_lines(text, drop_timings=False):
    """Every non-empty printed line, with timings (and every decimal on a line that prints a timing),
    temporary paths and rounding errors masked; lines that print a timing are left out altogether with
    `drop_timings` (a notebook measured at fewer sizes in its quick mode), as is the machine line
    ("measured on ...").

    What remains are shapes, parameter and token counts, tables, answers and losses: numbers the code
    computes identically on any machine. A rounding error must stay below 1e-4 (its exponent is
    checked); its digits may differ."""
    lines = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("measured on") or (drop_timings and TIME.search(line)):
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
    committed_nb = nbformat.read(path, as_version=4)
    quick = is_quick_aware(committed_nb)
    committed = stable_lines(text_of(committed_nb), drop_timings=quick)
    fresh_nb = execute(path)                                  # any failing cell raises here
    assert not any(o.get("output_type") == "error" for c in fresh_nb.cells if c.cell_type == "code"
                   for o in c.outputs)
    fresh = stable_lines(text_of(fresh_nb), drop_timings=quick)
    numbers = [line for line in committed if re.search(r"\d", line)]
    assert len(numbers) >= 5, f"{path.name} prints too few numbers for this check to mean anything"
    assert fresh == committed
    # every notebook shows at least one picture, and its exercise answers (the last cell) run
    assert images_of(fresh_nb), f"{path.name} drew no figure"
    last = fresh_nb.cells[-1]
    assert last.cell_type == "code" and "Answers" in last.source, f"{path.name} ends without its answer cell"
    assert text_of(nbformat.v4.new_notebook(cells=[last])).lstrip().startswith("1."), "the answers printed nothing"


STRAY = re.compile(r"^(<[\w.]+ (?:object )?at 0x[0-9a-f]+>|Text\(|\[<matplotlib|<matplotlib)")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_no_notebook_shows_a_stray_object(path):
    """A cell whose last line returns a matplotlib object shows its repr (`<matplotlib.colorbar.Colorbar at
    0x...>`, `Text(0.5, 0.98, ...)`) above the picture: noise a reader has to skip."""
    nb = nbformat.read(path, as_version=4)
    stray = [o["data"]["text/plain"] for c in nb.cells if c.cell_type == "code" for o in c.outputs
             if o.get("output_type") == "execute_result" and STRAY.match(o.get("data", {}).get("text/plain", ""))]
    assert not stray, stray


def test_notebook_1_prints_the_token_table_the_code_computes():
    text = text_of(nbformat.read(NOTEBOOKS[0], as_version=4))
    for side in (256, 512, 768, 1024):
        tokens, vit = R.FASTVITHD.num_tokens(side), (side // 14) ** 2
        assert f"| {side} | {tokens} | {vit} |" in text
    assert "| total | 122,714,208 |" in text
    for i, (c, stride) in enumerate(zip(R.FASTVITHD.widths, (4, 8, 16, 32, 64))):
        assert re.search(rf"stage {i + 1} .*\({c}, {1024 // stride}, {1024 // stride}\)\n", text)


# --- the words a reader sees ----------------------------------------------------------------------------

INTERNAL = re.compile(r"\b(seeds?|targets?|prototypes?|feasibility)\b", re.I)
# "seed" in its random-number sense: a sampling or data seed, a seeded generator
RANDOM_SEED = re.compile(r"--seed|`seed`|manual_seed|\bseeded\b|\bseeds? (?:for|of)\b"   # `seed`: the API's field
                         r"|\b(?:random|same|fixed|sampling|data|another|a|its|the|two) seeds?\b", re.I)


def prose_of_python(text):
    """Comments and docstrings of a Python source: the prose in it, not its identifiers."""
    import ast
    import io
    import tokenize

    pieces = [tok.string for tok in tokenize.generate_tokens(io.StringIO(text).readline)
              if tok.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                pieces.append(doc)
    return "\n".join(pieces)


def prose_files():
    root = Path(__file__).parent.parent
    yield root / "README.md", (root / "README.md").read_text()
    for path in sorted((root / "docs").glob("*.md")):
        yield path, path.read_text()
    tests = [p for p in sorted(Path(__file__).parent.glob("*.py")) if p.name != "test_notebooks.py"]  # (names them)
    for path in sorted(root.glob("*.py")) + sorted((root / "support").glob("*.py")) + sorted((root / "tools").glob("*.py")) + tests:
        yield path, prose_of_python(path.read_text())
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        without_magics = lambda src: "\n".join(l for l in src.splitlines() if not l.startswith(("%", "!")))  # noqa: E731
        yield path, "\n".join(c.source if c.cell_type == "markdown" else prose_of_python(without_magics(c.source))
                               for c in nb.cells)


def test_no_internal_words_in_prose():
    """README, docs, notebooks, comments and docstrings cite the paper and the released code; words from
    how the project is run ("seed" for a summary, "target", "prototype") mean nothing to a reader.
    Allowed: "seed" as a random seed (`--seed`, `manual_seed`, "seeded", "a seed for ...")."""
    found = []
    for path, text in prose_files():
        for line in text.splitlines():
            cleaned = RANDOM_SEED.sub("", line)
            if INTERNAL.search(cleaned):
                found.append(f"{path.name}: {line.strip()[:120]}")
    assert not found, "\n".join(found)


def test_notebook_6_prints_the_token_table_and_a_full_run():
    """The thesis notebook's token table is the code's, and its committed outputs are a full run
    (256-1024 px), not the quick one the suite executes."""
    nb = nbformat.read(NOTEBOOKS[5], as_version=4)
    text = text_of(nb)
    for side in (256, 512, 768, 1024):
        tokens, vit = R.FASTVITHD.num_tokens(side), (side // 14) ** 2
        assert f"| {side} | {tokens} | {vit} | {vit / tokens:.1f}x |" in text
        assert re.search(rf"^\| {side} \| [\d.]+ s \|", text, re.M), f"no measured row for {side} px"
    assert "measured on" in text and images_of(nb)
