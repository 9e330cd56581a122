"""infer.py: bad input gets one line on stderr and a non-zero exit; odd-but-valid images work."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import infer
import repmixer as R
from synthetic import write_fastvlm_checkpoint

ROOT = Path(__file__).parent.parent
SMALL_VISION = R.FastViTHDConfig(depths=(1, 1, 1, 1, 1), widths=(8, 16, 32, 64, 128), head_dim=16, image_size=128)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_fastvlm_checkpoint(tmp_path_factory.mktemp("model"), vision_cfg=SMALL_VISION)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(path)
    return path


def run(capsys, *args):
    code = infer.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, out, err, *fragments):
    assert code != 0
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for f in fragments:
        assert f in lines[0], lines[0]


def copy_model(model_dir, tmp_path, drop=()):
    dst = tmp_path / "m"
    shutil.copytree(model_dir, dst)
    for name in drop:
        (dst / name).unlink()
    return dst


# --- images that must work ---------------------------------------------------------------------------

def make_image(path, mode):
    if mode == "16-bit":
        Image.fromarray((np.arange(30 * 40, dtype=np.uint16).reshape(30, 40) * 50)).save(path)
    elif mode == "1x1":
        Image.new("RGB", (1, 1), (200, 10, 10)).save(path)
    else:
        Image.new(mode, (40, 30)).save(path)
    return path


@pytest.mark.parametrize("mode,suffix", [("1x1", ".png"), ("L", ".png"), ("P", ".png"), ("RGBA", ".png"),
                                         ("LA", ".png"), ("CMYK", ".jpg"), ("16-bit", ".png"), ("RGB", ".jpg")])
def test_unusual_images_work(capsys, tmp_path, model_dir, mode, suffix):
    path = make_image(tmp_path / f"img{suffix}", mode)
    code, out, err = run(capsys, path, "What is it?", "--model", model_dir, "--max-new-tokens", "3")
    assert code == 0, err
    assert out.endswith("\n") and err == ""


# --- bad input ----------------------------------------------------------------------------------------

def test_missing_image(capsys, model_dir, tmp_path):
    assert_one_line_error(*run(capsys, tmp_path / "nope.png", "q", "--model", model_dir), "image not found")


def test_not_an_image(capsys, model_dir, tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("just text")
    assert_one_line_error(*run(capsys, path, "q", "--model", model_dir), "not a readable image")


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_image(capsys, model_dir, photo, tmp_path, suffix):
    full = tmp_path / f"full{suffix}"
    Image.open(photo).save(full)
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(full.read_bytes()[: len(full.read_bytes()) // 2])
    assert_one_line_error(*run(capsys, cut, "q", "--model", model_dir), "not a readable image")


def test_decompression_bomb(capsys, model_dir, photo, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)          # the photo has 3,072 pixels > 2 x 100
    assert_one_line_error(*run(capsys, photo, "q", "--model", model_dir), "too large")


def test_empty_question(capsys, model_dir, photo):
    assert_one_line_error(*run(capsys, photo, "   ", "--model", model_dir), "question is empty")


def test_prompt_longer_than_context(capsys, model_dir, photo, tmp_path):
    folder = copy_model(model_dir, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["tokenizer_model_max_length"] = 64
    (folder / "config.json").write_text(json.dumps(config))
    assert_one_line_error(*run(capsys, photo, "word " * 80, "--model", folder), "context is 64")


def test_model_folder_missing(capsys, photo, tmp_path):
    assert_one_line_error(*run(capsys, photo, "q", "--model", tmp_path / "absent"), "model folder not found")


def test_model_path_is_a_file(capsys, photo, model_dir):
    assert_one_line_error(*run(capsys, photo, "q", "--model", model_dir / "model.safetensors"),
                          "is a file, not a model folder")


@pytest.mark.parametrize("drop,message", [
    (("model.safetensors",), "no model.safetensors"),
    (("config.json",), "no config.json"),
    (("vocab.json", "merges.txt"), "no tokenizer"),
])
def test_model_folder_incomplete(capsys, model_dir, photo, tmp_path, drop, message):
    folder = copy_model(model_dir, tmp_path, drop)
    assert_one_line_error(*run(capsys, photo, "q", "--model", folder), message)


def test_damaged_tokenizer_file(capsys, model_dir, photo, tmp_path):
    folder = copy_model(model_dir, tmp_path)
    (folder / "tokenizer.json").write_text("{ not json")
    assert_one_line_error(*run(capsys, photo, "q", "--model", folder), "tokenizer files are not readable")


def test_pickled_weights_refused_with_conversion_hint(capsys, model_dir, photo, tmp_path):
    folder = copy_model(model_dir, tmp_path, ("model.safetensors",))
    torch.save({"x": torch.zeros(1)}, folder / "pytorch_model.bin")
    assert_one_line_error(*run(capsys, photo, "q", "--model", folder), "pytorch_model.bin", "save_file")


def test_weights_disagree_with_config(capsys, model_dir, photo, tmp_path):
    folder = copy_model(model_dir, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 256
    (folder / "config.json").write_text(json.dumps(config))
    assert_one_line_error(*run(capsys, photo, "q", "--model", folder), "'model.layers.0.mlp.down_proj.weight'",
                          "config.json and the weights disagree")


def test_corrupt_weights_file(capsys, model_dir, photo, tmp_path):
    folder = copy_model(model_dir, tmp_path)
    (folder / "model.safetensors").write_bytes(b"\x00" * 100)
    assert_one_line_error(*run(capsys, photo, "q", "--model", folder), "not a readable safetensors file")


def test_unavailable_device(capsys, model_dir, photo):
    absent = [d for d in ("cuda", "mps") if d == "cuda" and not torch.cuda.is_available()
              or d == "mps" and not torch.backends.mps.is_available()]
    assert absent, "this test needs a machine without CUDA or without MPS"
    assert_one_line_error(*run(capsys, photo, "q", "--model", model_dir, "--device", absent[0]),
                          f"device '{absent[0]}' is not available")


def test_float16_on_cpu_refused(capsys, model_dir, photo):
    assert_one_line_error(*run(capsys, photo, "q", "--model", model_dir, "--device", "cpu", "--dtype", "float16"),
                          "float16 is refused on CPU")


def test_bad_sampling_options(capsys, model_dir, photo):
    assert_one_line_error(*run(capsys, photo, "q", "--model", model_dir, "--top-p", "0"), "--top-p")
    assert_one_line_error(*run(capsys, photo, "q", "--model", model_dir, "--max-new-tokens", "0"), "--max-new-tokens")


def test_no_default_model_yet(capsys, photo, monkeypatch, tmp_path):
    monkeypatch.setattr(infer, "DEFAULT_MODEL", tmp_path / "fastvlm-tiny")
    assert_one_line_error(*run(capsys, photo, "q"), "--model FOLDER")


# --- working paths --------------------------------------------------------------------------------------

def test_greedy_is_deterministic_and_sampling_is_seeded(capsys, model_dir, photo):
    """Each sampling option reaches the sampler: a seeded sample repeats, differs from greedy and from
    a sample with another seed (so --temperature and --seed are used), and a vanishing --top-p leaves the top token
    only, which is greedy again (so --top-p is used)."""
    base = ["--model", model_dir, "--max-new-tokens", "8"]
    greedy, again = run(capsys, photo, "q?", *base), run(capsys, photo, "q?", *base)
    assert greedy[0] == 0 and greedy[1] == again[1] and greedy[1].strip()
    hot = [*base, "--temperature", "3.0"]
    s3, s3_again, s4 = (run(capsys, photo, "q?", *hot, "--seed", seed) for seed in ("3", "3", "4"))
    assert s3[0] == s4[0] == 0
    assert s3[1] == s3_again[1]
    assert s3[1] != greedy[1] and s4[1] != greedy[1] and s3[1] != s4[1]
    nucleus = run(capsys, photo, "q?", *hot, "--seed", "3", "--top-p", "1e-9")
    assert nucleus[1] == greedy[1]


def test_plain_model_gives_the_same_answer(capsys, model_dir, photo):
    """--plain skips the speed step: the same greedy answer from the plain model files."""
    base = [photo, "q?", "--model", model_dir, "--max-new-tokens", "8"]
    fast, plain = run(capsys, *base), run(capsys, *base, "--plain")
    assert fast[0] == plain[0] == 0 and fast[1] == plain[1] and fast[1].strip()


def test_bfloat16_on_cpu_runs(capsys, model_dir, photo):
    code, out, err = run(capsys, photo, "q?", "--model", model_dir, "--dtype", "bfloat16", "--max-new-tokens", "3")
    assert code == 0, err


def test_interactive_chat_subprocess(model_dir, photo):
    proc = subprocess.run([sys.executable, str(ROOT / "infer.py"), str(photo), "--model", str(model_dir),
                           "--max-new-tokens", "3"], input="What is it?\nAnd then?\n\n",
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("> ") >= 2 and len(proc.stdout.strip().splitlines()) >= 2


def test_bad_input_through_a_real_process(photo, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "infer.py"), str(tmp_path / "missing.jpg"), "q"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [f"error: image not found: {tmp_path / 'missing.jpg'}"]
