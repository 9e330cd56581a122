"""train.py on LLaVA data as it is published (JSON lines, text-only records, leading assistant turns,
several datasets, missing images) and failures that lose nothing and block nothing."""

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import fastvlm as FV
import shapes_data
import train as T


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shapes")
    shapes_data.generate(folder, n_train=16, n_heldout=2, seed=5)
    return folder


def records(data):
    return json.loads((data / "train.json").read_text())


def run(data, out, files, *extra, images=None):
    args = ["--stage", "2", "--init", "scratch", "--data", *[str(f) for f in files], "--images",
            *[str(i) for i in (images or [data / "images"])], "--out", str(out), "--batch-size", "2",
            "--no-progress", "--threads", "1", *[str(e) for e in extra]]
    return T.main(args)


def last_error(capsys, code):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err and err[-1].startswith("error: "), err
    return err[-1]


TEXT_ONLY = {"id": "t1", "conversations": [{"from": "human", "value": "Say yes."}, {"from": "gpt", "value": "yes"}]}


def test_llava_data_as_published(capsys, data, tmp_path):
    """JSON lines, text-only records (no image, or "image": null), a leading assistant turn (dropped and
    counted), user/assistant roles, and two datasets with a folder each: one summary line, then training."""
    recs = records(data)
    lines = [json.dumps(r) for r in recs[:8]]
    lines.append(json.dumps({**TEXT_ONLY, "id": "t2", "image": None}))
    lines.append(json.dumps({"id": "lead", "image": recs[0]["image"], "conversations":
                             [{"from": "gpt", "value": "Hello!"}] + recs[0]["conversations"]}))
    lines.append(json.dumps({"id": "chat", "image": recs[1]["image"], "conversations":
                             [{"from": "user", "value": "<image>\nDescribe the image."},
                              {"from": "assistant", "value": "shapes"}]}))
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    other = tmp_path / "other_images"
    shutil.copytree(data / "images", other)
    (tmp_path / "b.json").write_text(json.dumps(recs[8:12] + [TEXT_ONLY]))
    code = run(data, tmp_path / "o", [tmp_path / "a.jsonl", tmp_path / "b.json"], "--steps", "3",
               images=[data / "images", other])
    err = capsys.readouterr().err
    assert code == 0, err
    summary = next(line for line in err.splitlines() if line.startswith("data: "))
    assert summary == ("data: a.jsonl: 11 records (1 text-only, 1 leading assistant turns dropped); "
                       "b.json: 5 records (1 text-only)")
    assert (tmp_path / "o" / "model.safetensors").is_file()


def test_text_only_rows_do_not_change_the_others(data):
    """A text-only conversation in a batch is padded after its end: the other rows' logits are those of
    a batch without it, and its own are those it has alone."""
    torch.manual_seed(0)
    model, tokenizer = T.build_scratch(T.load_records(data / "train.json"))
    model.eval()
    ds = T.Dataset(T.load_records(data / "train.json", data / "images"), None, tokenizer, 256, 2048)
    text = T.Dataset([T.normalise(TEXT_ONLY, "r", {"text-only": 0})], None, tokenizer, 256, 2048)[0]
    with torch.no_grad():
        mixed, spread = model(*T.collate([ds[0], text, ds[1]], 0))
        alone, _ = model(*T.collate([ds[0], ds[1]], 0))
        own, _ = model(*T.collate([text], 0))
    assert torch.allclose(mixed[[0, 2]], alone, atol=1e-5)
    n = own.shape[1]
    assert torch.allclose(mixed[1, :n], own[0], atol=1e-5) and (spread[1, n:] == -100).all()


@pytest.mark.parametrize("record,fragment", [
    ({"image": ["a.png", "b.png"]}, "lists 2 images"),
    ({"image": 7}, "'image' must be a file name"),
    ({"conversations": [{"from": "robot", "value": "x"}]}, "'from': 'human'|'gpt'"),
    ({"image": None}, "'<image>' marker but the record no 'image'"),
])
def test_bad_records_are_named(capsys, data, tmp_path, record, fragment):
    bad = {**records(data)[0], "id": "bad", **record}
    (tmp_path / "d.json").write_text(json.dumps(records(data)[:3] + [bad]))
    msg = last_error(capsys, run(data, tmp_path / "o", [tmp_path / "d.json"]))
    assert "record 3 (id 'bad')" in msg and fragment in msg
    assert not (tmp_path / "o").exists()


def test_missing_images_stop_or_are_skipped(capsys, data, tmp_path):
    recs = records(data)
    gone = [{**r, "id": f"gone{i}", "image": f"nope{i}.png"} for i, r in enumerate(recs[:4])]
    (tmp_path / "d.json").write_text(json.dumps(recs[:10] + gone))
    msg = last_error(capsys, run(data, tmp_path / "o", [tmp_path / "d.json"]))
    assert msg.startswith("error: 4 image(s) cannot be used") and "nope0.png" in msg and "--skip-missing-images" in msg
    assert run(data, tmp_path / "o", [tmp_path / "d.json"], "--steps", "1", "--skip-missing-images") == 0
    assert "data: d.json: 10 records (4 images skipped)" in capsys.readouterr().err


def test_images_folders_must_pair(capsys, data, tmp_path):
    msg = last_error(capsys, run(data, tmp_path / "o", [data / "train.json"] * 2, images=[data / "images"] * 3))
    assert "one folder for all data files or one per file" in msg


def test_image_that_fails_mid_run_keeps_a_resumable_checkpoint(capsys, data, tmp_path):
    """An image whose header reads but whose pixels do not (a truncated PNG) is met after a step was
    taken: the run saves that step, names the record, and --resume continues once it is fixed."""
    images = tmp_path / "images"
    shutil.copytree(data / "images", images)
    recs = records(data)[:8]
    broken = images / recs[7]["image"]
    good = broken.read_bytes()
    broken.write_bytes(good[:len(good) // 3])
    (tmp_path / "d.json").write_text(json.dumps(recs))
    out = tmp_path / "o"
    code = run(data, out, [tmp_path / "d.json"], "--steps", "4", "--seed", "1", images=[images])
    msg = last_error(capsys, code)
    assert "not a readable image" in msg and "--resume" in msg
    step = torch.load(out / T.STATE, weights_only=True)["step"]
    assert step >= 1
    broken.write_bytes(good)
    assert run(data, out, [tmp_path / "d.json"], "--steps", "4", "--seed", "1", "--resume", images=[images]) == 0
    assert torch.load(out / T.STATE, weights_only=True)["step"] == 4


def test_diverging_run_stops_and_keeps_nothing_bad(capsys, data, tmp_path):
    code = run(data, tmp_path / "o", [data / "train.json"], "--steps", "6", "--lr", "1e12")
    msg = last_error(capsys, code)
    assert "non-finite" in msg and "lower --lr" in msg
    assert not (tmp_path / "o").exists()             # no NaN checkpoint, nothing that blocks a rerun


@pytest.mark.parametrize("option,value,fragment", [("--batch-size", "0", "--batch-size must be at least 1"),
                                                   ("--max-length", "5", "--max-length must be at least 32"),
                                                   ("--lr", "nan", "--lr must be a finite number"),
                                                   ("--grad-accum", "0", "--grad-accum")])
def test_bad_options(capsys, data, tmp_path, option, value, fragment):
    args = ["--stage", "2", "--init", "scratch", "--data", str(data / "train.json"), "--images",
            str(data / "images"), "--out", str(tmp_path / "o"), "--no-progress", option, value]
    assert fragment in last_error(capsys, T.main(args))


def test_out_that_cannot_be_a_folder(capsys, data, tmp_path):
    (tmp_path / "file").write_text("x")
    assert "is a file" in last_error(capsys, run(data, tmp_path / "file", [data / "train.json"]))
    assert "which is a file" in last_error(capsys, run(data, tmp_path / "file" / "run", [data / "train.json"]))


def test_full_disk_and_leftovers(capsys, data, tmp_path, monkeypatch):
    out = tmp_path / "o"
    assert run(data, out, [data / "train.json"], "--steps", "1") == 0
    before = (out / "model.safetensors").read_bytes()
    (tmp_path / ".o.tmp-deadbeef").mkdir()                    # left by a killed save
    import safetensors.torch

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    msg = last_error(capsys, run(data, out, [data / "train.json"], "--steps", "2", "--resume"))
    assert f"no space left on {tmp_path}" in msg and "intact" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]        # no temporary folder left
    assert (out / "model.safetensors").read_bytes() == before


def test_damaged_training_state(capsys, data, tmp_path):
    out = tmp_path / "o"
    assert run(data, out, [data / "train.json"], "--steps", "1") == 0
    state = out / T.STATE
    state.write_bytes(state.read_bytes()[:1000])
    msg = last_error(capsys, run(data, out, [data / "train.json"], "--steps", "2", "--resume"))
    assert "is damaged" in msg and "weights_only=False" not in msg


def test_ctrl_c_saves_a_resumable_step(capsys, data, tmp_path, monkeypatch):
    real, calls = T.step_loss, []

    def interrupted_at_step_3(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(T, "step_loss", interrupted_at_step_3)
    out = tmp_path / "o"
    assert run(data, out, [data / "train.json"], "--steps", "5") == 130
    assert "step 2 is saved" in capsys.readouterr().err
    monkeypatch.setattr(T, "step_loss", real)
    assert torch.load(out / T.STATE, weights_only=True)["step"] == 2
    assert run(data, out, [data / "train.json"], "--steps", "5", "--resume") == 0
