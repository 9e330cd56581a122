"""The README keeps its promises: every command it shows runs, except those listed here with the reason
(a download, a GPU, or a duration a test suite cannot pay, each then run in its short form), and every
number it reports as measured carries the date it was measured."""

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()

# command (as the README shows it) -> why it is not run here, and what runs in its place (or None)
NOT_RUN = {
    "pip install -r requirements-dev.txt && python -m pytest": ("the suite itself", None),
    "hf download apple/FastVLM-0.5B --local-dir checkpoints/FastVLM-0.5B": ("needs a download", None),
    'python infer.py photo.jpg "What does the sign say?" --model checkpoints/FastVLM-0.5B':
        ("needs a download", None),
    'python infer.py photo.jpg "What does the sign say?" --model apple/FastVLM-0.5B': ("needs a download", None),
    "bash tools/make_tiny_model.sh": ("about 25 minutes on 2 cores; tests/test_train.py checks the model it made",
                                      None),
    "python train.py --stage 2 --init checkpoints/FastVLM-0.5B --lora 128 --freeze vision_tower --data my_data.json "
    "--images my_images/ --out runs/my-lora": ("needs a download and the user's data; tests/test_lora.py runs --lora on "
                                               "the tiny model", None),
    'python infer.py photo.jpg "What does the sign say?" --model checkpoints/FastVLM-0.5B --adapter runs/my-lora':
        ("needs a download", None),
    "bash tools/lora_recipe.sh": ("about 2 minutes on 2 cores; tests/test_lora_recipe.py runs it shortened", None),
    "python tools/bench.py ttft": ("minutes at the real shapes", "python tools/bench.py ttft --quick"),
    "python serve.py --port 8000": ("a server runs until stopped; tests/test_serve.py starts it on a free port and "
                                    "asks it with the openai client", None),
}
STDIN = {"python infer.py examples/shapes.png": "What color is the circle?\nAnd the square?\n\n"}


def blocks(language):
    return re.findall(rf"```{language}\n(.*?)```", README, re.S)


def commands():
    return [line.strip() for block in blocks("bash") for line in block.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_the_two_first_commands_are_the_contract():
    """A newcomer runs these two before anything else: set up and ask, set up and test."""
    assert commands()[:2] == ['pip install -r requirements.txt && python infer.py examples/shapes.png '
                              '"What color is the circle?"',
                              "pip install -r requirements-dev.txt && python -m pytest"]
    assert README.index("```bash") < README.index("```python") and not re.search(r"```\w+", README[:README.index("```bash")])


def test_every_listed_command_is_shown():
    """A command listed as not run that the README no longer shows is a stale entry."""
    assert set(NOT_RUN) <= set(commands())


@pytest.mark.inference
def test_every_command_runs(tmp_path):
    """Each command in order, in a copy of the checkout (they write answers.jsonl and runs/), with the
    packages already installed: `pip install ... &&` is left off."""
    work = tmp_path / "checkout"
    shutil.copytree(ROOT, work, ignore=shutil.ignore_patterns(".git", "runs", "results", "data", "__pycache__",
                                                              ".hypothesis", ".pytest_cache"))
    env = dict(os.environ, PYTHONPATH=str(work))
    ran = []
    for command in commands():
        reason, instead = NOT_RUN.get(command, (None, command))
        if instead is None:
            assert reason
            continue
        line = re.sub(r"^pip install -r requirements(-dev)?\.txt && ", "", instead)
        line = re.sub(r"^python ", f"{sys.executable} ", line)
        proc = subprocess.run(["bash", "-c", line], cwd=work, env=env, input=STDIN.get(command, ""), text=True,
                              capture_output=True, timeout=300)
        assert proc.returncode == 0, f"{command}\n{proc.stderr[-2000:]}"
        ran.append(command)
        if command.startswith("pip install -r requirements.txt && python infer.py"):
            assert proc.stdout.strip() == "red"                 # what the README promises the newcomer
    assert (work / "answers.jsonl").is_file() and (work / "runs" / "tiny" / "model.safetensors").is_file()
    assert len(ran) >= 8
    for code in blocks("python"):
        if "OpenAI(" in code:       # the client example: against serve.py, started on a free port
            with serving(work, env) as url:
                code = code.replace("http://127.0.0.1:8000/v1", url)
                proc = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, text=True, capture_output=True,
                                      timeout=300)
            assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr[-2000:]
            continue
        proc = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, text=True, capture_output=True,
                              timeout=300)
        assert proc.returncode == 0 and proc.stdout.strip() == "red", proc.stderr[-2000:]


@contextlib.contextmanager
def serving(work, env):
    """serve.py in `work` on a free port until the block ends; yields its /v1 URL."""
    proc = subprocess.Popen([sys.executable, "serve.py", "--port", "0"], cwd=work, env=env, stderr=subprocess.PIPE,
                            text=True)
    try:
        line, deadline = "", time.monotonic() + 120
        while "ready" not in line:
            assert time.monotonic() < deadline and proc.poll() is None, line
            line = proc.stderr.readline()
        yield line.split(" at ")[1].split(" ")[0]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


MEASURED = re.compile(r"\d[\d,.]*\s?(?:ms|s|min|minutes|tokens/s|samples/s|%|MiB|GiB|MB|GB|x)(?![\w/])")
DATE = re.compile(r"\b20\d\d-\d\d-\d\d\b")


def test_every_measured_number_carries_its_date():
    """Times, rates, percentages, sizes and ratios are measurements: each paragraph or table row that
    reports one names the date it was measured (or cites the paper, whose numbers are its own)."""
    text = re.sub(r"```.*?```", "", README, flags=re.S)          # commands and the figure are not reports
    pieces = [p for chunk in text.split("\n\n") for p in (chunk.splitlines() if chunk.lstrip().startswith("|")
                                                          else [chunk])]
    undated = [p for p in pieces if MEASURED.search(p) and not DATE.search(p) and "paper" not in p]
    assert not undated, undated


def test_every_link_of_the_readme_and_docs_leads_somewhere():
    """The README moved its details to docs/: every relative link of both resolves to a file, and every
    in-page anchor to a heading."""
    def anchors(text):
        return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
                for h in re.findall(r"^#+ (.*)$", text, re.M)}

    broken = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = page.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in anchors(linked.read_text())):
                broken.append(f"{page.name}: {target}")
    assert not broken, broken
