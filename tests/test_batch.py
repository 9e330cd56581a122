"""infer.py --batch and --json: the model loaded once, the same answers as one question at a time, bad
lines answered with an error, and a killed run resumed without losing or repeating answers."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import infer

pytestmark = pytest.mark.inference
ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def model_dir(small_model_dir):
    return small_model_dir


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    for i in range(3):
        pixels = np.random.default_rng(i).integers(0, 256, (40 + 8 * i, 56, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
    return folder


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def single_answer(capsys, image, question, model_dir, *extra):
    assert infer.main([str(image), question, "--model", str(model_dir), "--max-new-tokens", "6", *extra]) == 0
    return capsys.readouterr().out.removesuffix("\n")


def read_answers(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_batch_equals_single_questions(capsys, model_dir, images, tmp_path):
    """Answers in batch mode equal the single-question command's, for repeated images (encoded once) and
    for different ones; a chat group equals an interactive conversation."""
    questions = [("img0.png", "What is it?"), ("img1.png", "What is it?"), ("img0.png", "Describe it."),
                 ("img0.png", "Colours?"), ("img2.png", "Shapes?")]
    rows = [{"id": f"q{i}", "image": img, "question": q, "max_new_tokens": 6} for i, (img, q) in enumerate(questions)]
    rows += [{"id": "c1", "image": "img1.png", "question": "What is it?", "chat": True, "max_new_tokens": 6},
             {"id": "c2", "image": "img1.png", "question": "Are you sure?", "chat": True, "max_new_tokens": 6}]
    batch = write_jsonl(images / "questions.jsonl", rows)
    out = tmp_path / "answers.jsonl"
    assert infer.main(["--batch", str(batch), "--out", str(out), "--model", str(model_dir)]) == 0
    got = read_answers(out)
    assert [a["id"] for a in got] == [r["id"] for r in rows]
    for (img, q), a in zip(questions, got):
        assert a["answer"] == single_answer(capsys, images / img, q, model_dir)
        assert a["error"] is None and a["image"] == img and a["question"] == q
        assert a["tokens"] >= 1 and a["ttft_ms"] > 0
    chat = subprocess.run([sys.executable, "infer.py", str(images / "img1.png"), "--model", str(model_dir),
                           "--max-new-tokens", "6"], input="What is it?\nAre you sure?\n", cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert chat.returncode == 0
    assert chat.stdout == f"> {got[-2]['answer']}\n> {got[-1]['answer']}\n> "       # input()'s prompts
    assert len({a["answer"] for a in got}) > 2, "answers that are all alike would not show a mix-up"


def test_bad_lines_become_errors_and_the_run_goes_on(model_dir, images, tmp_path, capsys):
    rows = [{"image": "img0.png", "question": "Fine?"}, "{not json", "[1, 2]", {"question": "No image?"},
            {"image": "missing.png", "question": "Where?"}, {"image": "img0.png", "question": "  "},
            {"image": "questions.jsonl", "question": "Not an image?"}, {"image": "img0.png", "question": "x",
                                                                       "max_new_tokens": 0},
            {"image": "img1.png", "question": "Fine too?"}]
    batch = write_jsonl(images / "bad.jsonl", rows)
    (images / "questions.jsonl").write_text("not an image\n")
    assert infer.main(["--batch", str(batch), "--model", str(model_dir), "--max-new-tokens", "4"]) == 0
    got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [a["id"] for a in got] == list(range(1, 10))              # no id: the line number
    errors = [a["error"] for a in got]
    assert errors[0] is None and errors[-1] is None and got[-1]["answer"]
    for i, fragment in [(1, "not valid JSON"), (2, "not a JSON object"), (3, "no \"image\""), (4, "image not found"),
                        (5, "no \"question\""), (6, "not a readable image"), (7, "max_new_tokens")]:
        assert fragment in errors[i], (i, errors[i])
        assert got[i]["answer"] is None


def test_resume_after_a_kill(model_dir, images, tmp_path):
    """A run killed with SIGKILL loses at most the line in progress; rerunning with the same --out answers
    only the rest, and the file ends up equal to an uninterrupted run's."""
    rows = [{"image": f"img{i % 3}.png", "question": f"Question number {i}?"} for i in range(40)]
    batch = write_jsonl(images / "many.jsonl", rows)
    command = [sys.executable, "infer.py", "--batch", str(batch), "--model", str(model_dir), "--max-new-tokens", "12"]
    clean = tmp_path / "clean.jsonl"
    assert subprocess.run(command + ["--out", str(clean)], cwd=ROOT, capture_output=True, timeout=300).returncode == 0
    out = tmp_path / "resumed.jsonl"
    process = subprocess.Popen(command + ["--out", str(out)], cwd=ROOT, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 3):
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    written = out.read_text().count("\n")
    assert 3 <= written < 40, "the run was not interrupted in the middle"
    with open(out, "a") as f:
        f.write('{"id": 99, "answer": "half a li')                    # as if killed inside a write
    result = subprocess.run(command + ["--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0
    assert f"{written} of 40 questions already answered" in result.stderr
    strip = [{k: v for k, v in a.items() if k != "ttft_ms"} for a in read_answers(out)]
    assert strip == [{k: v for k, v in a.items() if k != "ttft_ms"} for a in read_answers(clean)]


def test_an_interrupted_chat_is_answered_again_whole(model_dir, images, tmp_path):
    rows = [{"id": "a", "image": "img0.png", "question": "Hi?"},
            {"id": "b", "image": "img1.png", "question": "What is it?", "chat": True},
            {"id": "c", "image": "img1.png", "question": "Sure?", "chat": True}]
    batch = write_jsonl(images / "chat.jsonl", rows)
    base = ["--batch", str(batch), "--model", str(model_dir), "--max-new-tokens", "5"]
    clean = tmp_path / "clean.jsonl"
    assert infer.main(base + ["--out", str(clean)]) == 0
    full = read_answers(clean)
    out = tmp_path / "partial.jsonl"
    out.write_text(json.dumps(full[0]) + "\n" + json.dumps(full[1]) + "\n")     # the conversation cut after b
    assert infer.main(base + ["--out", str(out)]) == 0
    got = read_answers(out)
    assert [a["id"] for a in got] == ["a", "b", "b", "c"]
    assert got[2:] == [dict(a, ttft_ms=g["ttft_ms"]) for a, g in zip(full[1:], got[2:])]


def test_json_for_one_question(capsys, model_dir, images):
    expected = single_answer(capsys, images / "img0.png", "What is it?", model_dir)
    out = single_answer(capsys, images / "img0.png", "What is it?", model_dir, "--json")
    record = json.loads(out)
    assert record["answer"] == expected and record["question"] == "What is it?" and record["error"] is None
    assert set(record) == {"id", "image", "question", "answer", "ttft_ms", "tokens", "error"}


@pytest.mark.parametrize("args,fragment", [
    (["--batch", "{dir}/nothing.jsonl"], "cannot read the question file"),
    (["--batch", "{dir}/empty.jsonl"], "has no questions"),
    (["--batch", "{dir}/twice.jsonl"], "is used twice"),
    (["{dir}/img0.png", "--batch", "{dir}/twice.jsonl"], "drop the IMAGE argument"),
    (["{dir}/img0.png", "Q?", "--out", "x.jsonl"], "--out goes with --batch"),
    (["--batch", "{dir}/one.jsonl", "--out", "{dir}/foreign.jsonl"], "not answers of this program"),
])
def test_bad_batch_options(capsys, model_dir, images, args, fragment):
    (images / "empty.jsonl").write_text("\n\n")
    write_jsonl(images / "twice.jsonl", [{"id": 1, "image": "img0.png", "question": "a"},
                                         {"id": 1, "image": "img0.png", "question": "b"}])
    write_jsonl(images / "one.jsonl", [{"image": "img0.png", "question": "a"}])
    (images / "foreign.jsonl").write_text("hello\n")
    code = infer.main([a.format(dir=images) for a in args] + ["--model", str(model_dir)])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and fragment in err, err


def test_hostile_batch_files(capsys, model_dir, images, tmp_path):
    """A lone surrogate escape is an error answer (a rerun does not crash on it); a byte-order mark is
    fine; --out that is a folder, the question file itself, or someone's notes is refused untouched."""
    batch = images / "hostile.jsonl"
    batch.write_bytes(b"\xef\xbb\xbf" + b'{"id": "bom", "image": "img0.png", "question": "Hi?"}\n'
                      + b'{"id": "s", "image": "img0.png", "question": "\\ud800 hi"}\n'
                      + b'{"id": "c", "image": "img0.png", "question": "Hi?", "chat": "yes"}\n')
    out = tmp_path / "a.jsonl"
    for _ in range(2):
        assert infer.main(["--batch", str(batch), "--out", str(out), "--model", str(model_dir),
                           "--max-new-tokens", "2"]) == 0
    got = read_answers(out)
    assert [a["id"] for a in got] == ["bom", 2, "c"]           # its own text cannot be written: its line number
    assert got[0]["error"] is None and "surrogate" in got[1]["error"] and "true or false" in got[2]["error"]
    assert "2 of 3 questions could not be answered" in capsys.readouterr().err
    notes = tmp_path / "notes.txt"
    notes.write_text("line one\nline two")
    for target, fragment in [(tmp_path, "not a regular file"), (batch, "the question file itself"),
                             (notes, "not answers of this program")]:
        code = infer.main(["--batch", str(batch), "--out", str(target), "--model", str(model_dir)])
        out_text, err = capsys.readouterr()
        assert code == 2 and len(err.strip().splitlines()) == 1 and fragment in err, err
    assert notes.read_text() == "line one\nline two"
