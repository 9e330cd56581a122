"""infer.py --batch and --json: the model loaded once, the same answers as one question at a time, bad
lines answered with an error, a file that is not questions refused whole, a killed run or a full disk
resumed without losing or repeating answers, and --out locked against a second run."""

import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fastvlm as FV
import infer
from support import batch as BA, chat as CH, loading

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


@pytest.fixture(scope="module")
def loaded(model_dir):
    """The small model as infer.py loads it (the speed step on, float32, CPU), once for the module."""
    return loading.load_model(model_dir)


@pytest.fixture
def fast_load(monkeypatch, loaded, model_dir):
    """support.options.load handing out the model loaded once: these tests are about what a run does with its
    answers (loading is test_infer.py's), so a run costs its questions only."""
    def load(args):
        assert args.model == str(model_dir) and args.dtype == "auto" and args.device == "auto" and not args.plain
        return (*loaded, torch.device("cpu"))

    monkeypatch.setattr(BA, "load", load)


def api_answers(loaded, images, questions, system=FV.SYSTEM_PROMPT, **options):
    """Each (image, question) asked through the Python API, a new conversation each."""
    model, tokenizer, config = loaded
    return [CH.Chat(model, tokenizer, CH.load_image(images / image), config, system=system).ask(question, **options)
            for image, question in questions]


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
                           "--max-new-tokens", "6", "--dtype", "float32"],     # (conftest's CPU does not reach a
                          input="What is it?\nAre you sure?\n", cwd=ROOT,     # subprocess: auto may be bf16)
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


def test_an_interrupted_chat_is_answered_again_whole(fast_load, model_dir, images, tmp_path, capsys):
    """A conversation cut after its first answer (a kill or a full disk inside its write) is answered
    again whole on the rerun, its first answer replaced rather than repeated: a rerun used to write
    that id twice. Part of a conversation elsewhere in --out (an answer deleted by hand to ask it again)
    is refused in one line naming the ids to delete, the file untouched."""
    rows = [{"id": "a", "image": "img0.png", "question": "Hi?"},
            {"id": "b", "image": "img1.png", "question": "What is it?", "chat": True},
            {"id": "c", "image": "img1.png", "question": "Sure?", "chat": True},
            {"id": "d", "image": "img2.png", "question": "And this?"}]
    batch = write_jsonl(images / "chat.jsonl", rows)
    base = ["--batch", str(batch), "--model", str(model_dir), "--max-new-tokens", "5"]
    clean = tmp_path / "clean.jsonl"
    assert infer.main(base + ["--out", str(clean)]) == 0
    full = read_answers(clean)
    out = tmp_path / "partial.jsonl"
    out.write_text(json.dumps(full[0]) + "\n" + json.dumps(full[1]) + "\n")     # the conversation cut after b
    assert infer.main(base + ["--out", str(out)]) == 0
    got = read_answers(out)
    assert [a["id"] for a in got] == ["a", "b", "c", "d"]
    assert got == [dict(a, ttft_ms=g["ttft_ms"]) for a, g in zip(full, got)]
    capsys.readouterr()
    hand = tmp_path / "edited.jsonl"
    hand.write_text(json.dumps(full[1]) + "\n" + json.dumps(full[3]) + "\n")     # c deleted, then d
    assert infer.main(base + ["--out", str(hand)]) == 2
    out_text, err = capsys.readouterr()
    assert out_text == "" and len(err.strip().splitlines()) == 1
    assert "part of the conversation of lines 2-3" in err and 'ids "b"' in err, err
    assert read_answers(hand) == [full[1], full[3]]


def test_json_for_one_question(capsys, model_dir, images):
    expected = single_answer(capsys, images / "img0.png", "What is it?", model_dir)
    out = single_answer(capsys, images / "img0.png", "What is it?", model_dir, "--json")
    record = json.loads(out)
    assert record["answer"] == expected and record["question"] == "What is it?" and record["error"] is None
    assert set(record) == {"id", "image", "question", "answer", "ttft_ms", "tokens", "error", "precision"}
    assert record["precision"]["dtype"] == "float32" and record["precision"]["quantize"] is None
    assert record["precision"]["dtype_why"].startswith("--dtype auto: ") and record["precision"]["weight_mib"] > 0


@pytest.mark.parametrize("args,fragment", [
    (["--batch", "{dir}/nothing.jsonl"], "cannot read the question file"),
    (["--batch", "{dir}/empty.jsonl"], "has no questions"),
    (["--batch", "{dir}/twice.jsonl"], "is used twice"),
    (["{dir}/img0.png", "--batch", "{dir}/twice.jsonl"], "drop the IMAGE argument"),
    (["{dir}/img0.png", "Q?", "--out", "x.jsonl"], "--out goes with --batch"),
    (["--batch", "{dir}/one.jsonl", "--out", "{dir}/foreign.jsonl"], "not answers of this program"),
    (["--batch", "{dir}/one.jsonl", "--json"], "drop --json"),
    (["--max-new-tokens", "3"], "give an image (and a question), or --batch FILE"),
    (["{dir}/img0.png", "--json"], "--json needs a question"),
])
def test_bad_batch_options(capsys, model_dir, images, args, fragment):
    """Options that do not go together, and batch files that cannot be answered: one line, before
    anything loads."""
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


# --- options reach every answer ---------------------------------------------------------------------------

def test_batch_options_reach_every_answer(fast_load, loaded, model_dir, images, capsys):
    """--system, --temperature, --seed, --top-p and --max-new-tokens reach every batch answer (a batch
    run that ignored --system passed): each run's answers are the Python API's with the same options,
    and each option changes them."""
    questions = [("img0.png", "What is it?"), ("img1.png", "Describe it.")]
    batch = write_jsonl(images / "options.jsonl", [{"image": i, "question": q} for i, q in questions])
    hot = dict(temperature=3.0, seed=3)
    cases = {"greedy": ([], {}),
             "system": (["--system", "Answer in French."], dict(system="Answer in French.")),
             "hot": (["--temperature", "3", "--seed", "3"], hot),
             "other": (["--temperature", "3", "--seed", "4"], dict(hot, seed=4)),
             "nucleus": (["--temperature", "3", "--seed", "3", "--top-p", "1e-9"], dict(hot, top_p=1e-9)),
             "short": (["--max-new-tokens", "3"], dict(max_new_tokens=3))}
    got = {}
    for name, (flags, options) in cases.items():
        assert infer.main(["--batch", str(batch), "--model", str(model_dir), "--max-new-tokens", "8", *flags]) == 0
        got[name] = [json.loads(line)["answer"] for line in capsys.readouterr().out.splitlines()]
        expected = api_answers(loaded, images, questions, **{"max_new_tokens": 8, **options})
        assert got[name] == expected, name
    assert got["system"] != got["greedy"] and got["short"] != got["greedy"]
    assert got["hot"] != got["greedy"] and got["hot"] != got["other"]
    assert got["nucleus"] == got["greedy"]                     # a vanishing top-p leaves the top token only


def test_chat_lines_about_another_image_start_a_new_conversation(fast_load, loaded, model_dir, images, capsys):
    """Consecutive chat lines about two images are two conversations, the second about its own image: a
    run that continued the first conversation answered the second image's questions about the first."""
    rows = [{"id": 1, "image": "img0.png", "question": "What is it?", "chat": True},
            {"id": 2, "image": "img1.png", "question": "What is it?", "chat": True},
            {"id": 3, "image": "img1.png", "question": "Are you sure?", "chat": True}]
    batch = write_jsonl(images / "two_chats.jsonl", rows)
    assert infer.main(["--batch", str(batch), "--model", str(model_dir), "--max-new-tokens", "6"]) == 0
    got = [json.loads(line)["answer"] for line in capsys.readouterr().out.splitlines()]
    model, tokenizer, config = loaded
    first = CH.Chat(model, tokenizer, CH.load_image(images / "img0.png"), config)
    second = CH.Chat(model, tokenizer, CH.load_image(images / "img1.png"), config)
    assert got == [first.ask("What is it?", max_new_tokens=6), second.ask("What is it?", max_new_tokens=6),
                   second.ask("Are you sure?", max_new_tokens=6)]
    assert got[1] != first.ask("What is it?", max_new_tokens=6), "the first conversation, continued, would answer alike"


def test_timing_adds_its_lines_on_stderr_only(fast_load, model_dir, images, capsys):
    """--timing adds the time to first token by part and the peak memory on stderr (after the answer of
    a single question; once at the end of a batch), and changes no answer."""
    single = [str(images / "img0.png"), "What is it?", "--model", str(model_dir), "--max-new-tokens", "4"]
    batch = ["--batch", str(write_jsonl(images / "timing.jsonl", [{"image": "img0.png", "question": "What is it?"}])),
             "--model", str(model_dir), "--max-new-tokens", "4"]
    runs = {}
    for name, argv in [("single", single), ("batch", batch)]:
        for timing in ([], ["--timing"]):
            assert infer.main(argv + timing) == 0
            out, err = capsys.readouterr()
            runs[name, bool(timing)] = (out if name == "single" else json.loads(out)["answer"]), err.splitlines()
    assert runs["single", True][0] == runs["single", False][0] and runs["batch", True][0] == runs["batch", False][0]
    assert runs["single", False][1] == runs["batch", False][1] == []
    lines = runs["single", True][1]
    assert lines[0].startswith("time to first token: ") and lines[1].startswith("  preprocess ")
    assert lines[-2].startswith("peak process memory: ") and len(lines) <= 5       # and the decode rate
    assert lines[-1].startswith("ran in float32 (--dtype auto: ") and " MiB (float32), loaded in " in lines[-1]
    assert len(runs["batch", True][1]) == 1 and runs["batch", True][1][0].startswith("peak process memory: ")
    # (the precision line of a batch: tests/test_precision.py, with the real loader)


@pytest.mark.parametrize("own", [False, True], ids=["run's limit", "each line's own"])
def test_max_new_tokens_beyond_the_context(fast_load, model_dir, images, tmp_path, capsys, own):
    """--max-new-tokens beyond the model's context made every batch line an error answer, each then
    counted as answered: now one line and exit 2, nothing written. A line's own limit beyond the context
    is that line's error (naming the line's "max_new_tokens", not --max-new-tokens), and then the run's
    --max-new-tokens, unused, is no reason to refuse."""
    limit = {"max_new_tokens": 10 ** 6} if own else {}
    batch = write_jsonl(images / f"long_{own}.jsonl", [{"id": 1, "image": "img0.png", "question": "Hi?", **limit},
                                                       {"id": 2, "image": "img1.png", "question": "Hi?", **limit}])
    out = tmp_path / "answers.jsonl"
    code = infer.main(["--batch", str(batch), "--out", str(out), "--model", str(model_dir),
                       "--max-new-tokens", "100000"])
    out_text, err = capsys.readouterr()
    if own:
        assert code == 0 and [a["id"] for a in read_answers(out)] == [1, 2]
        assert all("the model's context is 8192" in a["error"] for a in read_answers(out))
        # the limit to lower is the line's own field, not the option
        assert all('the line\'s "max_new_tokens"' in a["error"] and "--max-new-tokens" not in a["error"]
                   for a in read_answers(out))
    else:
        assert code == 2 and out_text == "" and len(err.strip().splitlines()) == 1
        assert "--max-new-tokens 100000 leaves no room" in err and "context of 8192 tokens" in err, err
        assert out.read_text() == ""


# --- input that is not questions, --out shared, a full disk -----------------------------------------------

def png_bytes(images):
    return (images / "img0.png").read_bytes()


@pytest.mark.parametrize("content,fragment", [
    (lambda images: np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes(), "holds binary data"),
    (png_bytes, "holds binary data"),
    (lambda images: "{}".encode("utf-16"), "holds binary data"),
    (lambda images: b"# My questions\nWhat is in img0.png?\nAnd in img1.png?\n" * 3,
     "none of its first 5 lines is a JSON object (line 1: the line is not valid JSON"),
    (lambda images: b'["img0.png", "What is it?"]\n' * 9, "none of its first 5 lines is a JSON object"),
    (lambda images: b"hello\n\n", "none of its lines is a JSON object"),
], ids=["random bytes", "a PNG", "UTF-16", "notes", "JSON arrays", "one word"])
def test_a_file_that_is_not_json_lines_is_refused_whole(capsys, model_dir, images, tmp_path, content, fragment):
    """Random bytes or a PNG given as --batch used to exit 0 with an error "answer" per line appended,
    each then counting as answered: now one line and exit 2 before anything is written or loaded."""
    batch = tmp_path / "questions.jsonl"
    batch.write_bytes(content(images))
    out = tmp_path / "answers.jsonl"
    code = infer.main(["--batch", str(batch), "--out", str(out), "--model", str(model_dir)])
    out_text, err = capsys.readouterr()
    assert code == 2 and out_text == "" and len(err.strip().splitlines()) == 1 and fragment in err, err
    assert not out.exists()


@pytest.mark.parametrize("bad,refused", [(4, False), (5, True)])
def test_a_few_bad_lines_before_good_ones_are_answered(tmp_path, bad, refused):
    """The rule's edge: a file whose first 4 lines are not JSON but whose 5th is a question is read, the
    bad lines to become error answers (a file with some bad lines among good ones works as before);
    5 bad lines first is not a question file."""
    batch = write_jsonl(tmp_path / "q.jsonl", ["oops"] * bad + ["", {"image": "img0.png", "question": "Hi?"}])
    if refused:
        with pytest.raises(infer.UsageError, match="none of its first 5 lines"):
            BA.read_batch(batch)
    else:
        items = BA.read_batch(batch)
        assert [n for n, _ in items] == [1, 2, 3, 4, 6]
        assert all("not valid JSON" in item for _, item in items[:4]) and items[4][1]["image"] == "img0.png"


def test_a_huge_question_line_is_held_once(tmp_path):
    """read_batch held the whole file, its list of lines, their decoded copies and a re-encoding at once
    (5x a 20 MB question line at its peak); now it reads a line at a time: the line's bytes, its text
    and the parsed question at the peak, the question alone after."""
    question = "word " * 4_000_000
    batch = write_jsonl(tmp_path / "big.jsonl", [{"image": "img0.png", "question": question},
                                                 {"image": "a", "question": "b"}])
    size = batch.stat().st_size
    tracemalloc.start()
    try:
        items = BA.read_batch(batch)
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert items[0][1]["question"] == question and len(items) == 2
    assert held < 1.1 * size and peak < 3.5 * size, (held / size, peak / size)


LOCK_HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()
"""


def test_a_second_run_on_the_same_out_is_refused(fast_load, model_dir, images, tmp_path, capsys, monkeypatch):
    """Two runs on one --out at once both exited 0 with every id answered twice. A run locks --out: a
    second one is refused at once in one line naming the holder's pid (where /proc/locks tells it),
    while the lock is held, also by this run while it answers; and the lock ends with its process,
    even a killed one, so that the next run goes ahead."""
    batch = write_jsonl(images / "locked.jsonl", [{"image": "img0.png", "question": "Hi?"},
                                                  {"image": "img1.png", "question": "Hi?"}])
    out = tmp_path / "answers.jsonl"
    argv = ["--batch", str(batch), "--out", str(out), "--model", str(model_dir), "--max-new-tokens", "3"]

    def holder_named(pid):
        return f"another process (pid {pid}) holds the lock" if Path("/proc/locks").exists() else \
            "another process holds the lock"

    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        assert infer.main(argv) == 2
        out_text, err = capsys.readouterr()
        assert out_text == "" and len(err.strip().splitlines()) == 1 and holder_named(holder.pid) in err, err
    finally:
        holder.kill()
        holder.wait(timeout=30)
    second = []
    ask = CH.Chat.ask

    def ask_and_start_another_run(self, *args, **kwargs):
        if not second:                                   # in the middle of this run, another on the same --out
            second.append(infer.main(argv))
        return ask(self, *args, **kwargs)

    monkeypatch.setattr(CH.Chat, "ask", ask_and_start_another_run)
    assert infer.main(argv) == 0
    assert second == [2] and holder_named(os.getpid()) in capsys.readouterr().err
    assert [a["id"] for a in read_answers(out)] == [1, 2]


FULL_DISK = 450      # bytes: an answer line here is about 150, so two are written whole and a third is cut


@pytest.mark.parametrize("to", ["out", "stdout"])
def test_a_full_disk_stops_with_one_line_and_the_rerun_answers_the_rest(fast_load, loaded, model_dir, images,
                                                                        tmp_path, capsys, to):
    """On a full disk (here a file-size limit: Python ignores SIGXFSZ, so a write past it fails with
    EFBIG as ENOSPC would) a run printed its one line, then a traceback: closing --out wrote the same
    buffered text again, and that error replaced the first. Now one line and exit 2; --out keeps whole
    answers only (the cut write is undone), and a rerun after freeing space answers the rest, each id
    once. To stdout, where nothing can be resumed, the line says to use --out."""
    questions = [(f"img{i % 3}.png", f"Question {i}?") for i in range(6)]
    batch = write_jsonl(images / "full.jsonl", [{"image": i, "question": q} for i, q in questions])
    out = tmp_path / "answers.jsonl"
    argv = ["--batch", str(batch), "--model", str(model_dir), "--max-new-tokens", "4"]
    argv_out = argv + (["--out", str(out)] if to == "out" else [])
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    with open(tmp_path / "stdout", "wb") as stdout:
        proc = subprocess.run([sys.executable, "infer.py", *argv_out], cwd=ROOT, stdout=stdout, stderr=subprocess.PIPE,
                              text=True, timeout=300, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
                              preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (FULL_DISK, hard)))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert re.match(r"error: cannot write (to \S+answers.jsonl|the answers to stdout) \(File too large\)", proc.stderr)
    if to == "stdout":
        assert "pass --out FILE" in proc.stderr
        return
    assert "kept whole: free space and rerun with the same --out" in proc.stderr
    kept = read_answers(out)                                        # every line whole
    assert 1 <= len(kept) < len(questions) and out.stat().st_size <= FULL_DISK
    assert infer.main(argv_out) == 0
    assert f"{len(kept)} of 6 questions already answered" in capsys.readouterr().err
    got = read_answers(out)
    assert got[:len(kept)] == kept and [a["id"] for a in got] == list(range(1, 7))
    assert [a["answer"] for a in got] == api_answers(loaded, images, questions, max_new_tokens=4)


# --- found by a red team -----------------------------------------------------------------------------------

def test_a_huge_integer_is_a_bad_line(tmp_path):
    """An integer of more than 4,300 digits makes json.loads raise a plain ValueError (Python's limit on
    int-string conversion), not a JSONDecodeError: it was a traceback; now that line's error answer."""
    batch = write_jsonl(tmp_path / "q.jsonl", ['{"id": 1' + "0" * 5000 + ', "image": "a", "question": "b"}',
                                               {"image": "img0.png", "question": "Hi?"}])
    items = BA.read_batch(batch)
    assert [n for n, _ in items] == [1, 2] and items[1][1]["question"] == "Hi?"
    assert items[0][1].startswith("the line is not valid JSON"), items[0][1]


def test_a_system_prompt_too_long_is_refused_before_any_answer(fast_load, model_dir, images, tmp_path, capsys):
    """A --system too long for any question made every line an error answer, exit 0, each counted as
    answered, so that a rerun with a fixed --system answered nothing. Now one line naming --system, exit
    2, nothing written; the rerun answers every line."""
    batch = write_jsonl(images / "system.jsonl", [{"image": "img0.png", "question": "Hi?"},
                                                  {"image": "img1.png", "question": "Hi?"}])
    out = tmp_path / "answers.jsonl"
    argv = ["--batch", str(batch), "--out", str(out), "--model", str(model_dir), "--max-new-tokens", "3"]
    assert infer.main(argv + ["--system", "word " * 9000]) == 2
    out_text, err = capsys.readouterr()
    assert out_text == "" and len(err.strip().splitlines()) == 1 and "error: --system is too long" in err, err
    assert out.read_text() == ""
    assert infer.main(argv + ["--system", "Be brief."]) == 0
    assert [(a["id"], a["error"]) for a in read_answers(out)] == [(1, None), (2, None)]


def test_a_last_answer_without_its_newline_is_kept(tmp_path):
    """A whole last answer whose final newline an editor stripped was cut away as if a kill had cut it,
    and asked again. Now it counts as answered and gets its newline back; a last line cut short is still
    removed."""
    first, last = ({"id": i, "image": "a", "question": "q", "answer": "x", "error": None} for i in (1, 2))
    out = tmp_path / "answers.jsonl"
    out.write_text(json.dumps(first) + "\n" + json.dumps(last))
    whole = json.dumps(first) + "\n" + json.dumps(last) + "\n"
    assert BA.answered_ids(out) == [("1", 0), ("2", len(json.dumps(first)) + 1)]
    assert out.read_text() == whole
    out.write_text(whole + json.dumps(last)[:-5])                     # killed inside the next write
    assert [key for key, _ in BA.answered_ids(out)] == ["1", "2"] and out.read_text() == whole


def test_blank_lines_in_out_are_skipped_and_a_foreign_line_is_named(tmp_path):
    """An answer deleted by hand (as the run advises, to ask it again) may leave a blank line, which made
    --out refused as "not answers"; blank lines are skipped now. A line that is not an answer is named
    by its number."""
    answer = json.dumps({"id": 1, "image": "a", "question": "q", "answer": "x", "error": None}) + "\n"
    out = tmp_path / "answers.jsonl"
    out.write_text("\n" + answer + "  \n" + answer.replace('"id": 1', '"id": 3'))
    assert BA.answered_ids(out) == [("1", 1), ("3", 1 + len(answer) + 3)]
    out.write_text(answer + "\n" + "my notes\n" + answer)
    with pytest.raises(infer.UsageError, match=r"not answers of this program \(line 3\)"):
        BA.answered_ids(out)


def test_a_question_file_that_is_a_pipe_is_refused(tmp_path):
    """--batch on a FIFO with no writer hung in open() for ever; a path that is not a regular file is
    refused in one line before it is opened. (The alarm ends the test should open() block.)"""
    os.mkfifo(tmp_path / "pipe")

    def hung(*args):
        raise TimeoutError("read_batch blocked on the FIFO")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(10)
    try:
        for path in (tmp_path / "pipe", tmp_path):
            with pytest.raises(infer.UsageError, match="is not a regular file"):
                BA.read_batch(path)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
