"""train.py on LLaVA data as it is published (JSON lines, text-only records, leading assistant turns,
several datasets, missing images) and failures that lose nothing and block nothing."""

import errno
import json
import shutil

import pytest
import torch

import fastvlm as FV
import shapes_data
import train as T
from support import llava_data as DA, options as OP, training as TR  # noqa: E402


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
    counted), user/assistant roles, and two datasets with a folder each (each folder holds only its own
    file's images, so a wrong pairing fails): one summary line, then training."""
    recs = records(data)
    lines = [json.dumps(r) for r in recs[:8]]
    lines.append(json.dumps({**TEXT_ONLY, "id": "t2", "image": None}))
    lines.append(json.dumps({"id": "lead", "image": recs[0]["image"], "conversations":
                             [{"from": "gpt", "value": "Hello!"}] + recs[0]["conversations"]}))
    lines.append(json.dumps({"id": "chat", "image": recs[1]["image"], "conversations":
                             [{"from": "user", "value": "<image>\nDescribe the image."},
                              {"from": "assistant", "value": "shapes"}]}))
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    # b's folder holds only b's images, under names the first folder lacks: a data file paired with the
    # other's folder (or every file with the first) finds none of its images and fails
    other = tmp_path / "other_images"
    other.mkdir()
    b_records = [{**r, "image": "b_" + r["image"]} for r in recs[8:12]]
    for r, b in zip(recs[8:12], b_records):
        shutil.copy(data / "images" / r["image"], other / b["image"])
    (tmp_path / "b.json").write_text(json.dumps(b_records + [TEXT_ONLY]))
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
    model, tokenizer = TR.build_scratch(DA.load_records(data / "train.json"))
    model.eval()
    ds = DA.Dataset(DA.load_records(data / "train.json", data / "images"), None, tokenizer, 256, 2048)
    text = DA.Dataset([DA.normalise(TEXT_ONLY, "r", {"text-only": 0})], None, tokenizer, 256, 2048)[0]
    with torch.no_grad():
        mixed, spread = model(*DA.collate([ds[0], text, ds[1]], 0))
        alone, _ = model(*DA.collate([ds[0], ds[1]], 0))
        own, _ = model(*DA.collate([text], 0))
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
    """Each kind of bad record is refused in one line that names the record and what is wrong; nothing
    is written."""
    bad = {**records(data)[0], "id": "bad", **record}
    (tmp_path / "d.json").write_text(json.dumps(records(data)[:3] + [bad]))
    msg = last_error(capsys, run(data, tmp_path / "o", [tmp_path / "d.json"]))
    assert "record 3 (id 'bad')" in msg and fragment in msg
    assert not (tmp_path / "o").exists()


def test_missing_images_stop_or_are_skipped(capsys, data, tmp_path):
    """Missing images stop the run with the first few named and the total, or with --skip-missing-images
    are left out and counted in the summary line."""
    recs = records(data)
    gone = [{**r, "id": f"gone{i}", "image": f"nope{i}.png"} for i, r in enumerate(recs[:4])]
    (tmp_path / "d.json").write_text(json.dumps(recs[:10] + gone))
    msg = last_error(capsys, run(data, tmp_path / "o", [tmp_path / "d.json"]))
    assert msg.startswith("error: 4 image(s) cannot be used") and "nope0.png" in msg and "--skip-missing-images" in msg
    assert run(data, tmp_path / "o", [tmp_path / "d.json"], "--steps", "1", "--skip-missing-images") == 0
    assert "data: d.json: 10 records (4 images skipped)" in capsys.readouterr().err


def test_images_folders_must_pair(capsys, data, tmp_path):
    """--images gives one folder for all data files or one per file; any other count is one line."""
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
    step = torch.load(out / TR.STATE, weights_only=True)["step"]
    assert step >= 1
    broken.write_bytes(good)
    assert run(data, out, [tmp_path / "d.json"], "--steps", "4", "--seed", "1", "--resume", images=[images]) == 0
    assert torch.load(out / TR.STATE, weights_only=True)["step"] == 4


def test_diverging_run_stops_and_keeps_nothing_bad(capsys, data, tmp_path):
    """A diverging run (the loss turns non-finite) stops in one line, writes no NaN checkpoint and leaves no
    folder that would block the rerun."""
    code = run(data, tmp_path / "o", [data / "train.json"], "--steps", "6", "--lr", "1e12")
    msg = last_error(capsys, code)
    assert "non-finite" in msg and "lower --lr" in msg
    assert not (tmp_path / "o").exists()             # no NaN checkpoint, nothing that blocks a rerun


@pytest.mark.parametrize("option,value,fragment", [("--batch-size", "0", "--batch-size must be at least 1"),
                                                   ("--max-length", "5", "--max-length must be at least 32"),
                                                   ("--lr", "nan", "--lr must be a finite number"),
                                                   ("--grad-accum", "0", "--grad-accum")])
def test_bad_options(capsys, data, tmp_path, option, value, fragment):
    """Options that cannot work are refused in one line that names the option, before anything loads."""
    args = ["--stage", "2", "--init", "scratch", "--data", str(data / "train.json"), "--images",
            str(data / "images"), "--out", str(tmp_path / "o"), "--no-progress", option, value]
    assert fragment in last_error(capsys, T.main(args))


def test_out_that_cannot_be_a_folder(capsys, data, tmp_path):
    """--out that is a file, or lies under one, is refused in one line."""
    (tmp_path / "file").write_text("x")
    assert "is a file" in last_error(capsys, run(data, tmp_path / "file", [data / "train.json"]))
    assert "which is a file" in last_error(capsys, run(data, tmp_path / "file" / "run", [data / "train.json"]))


def test_full_disk_and_leftovers(capsys, data, tmp_path, monkeypatch):
    """A full disk while saving (ENOSPC) is one line; the previous checkpoint stays intact, and the temporary
    folders of this save and of an earlier interrupted one are gone."""
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
    """A truncated training_state.pt is one line, which never suggests unpickling it (weights_only=False
    would run whatever code it holds)."""
    out = tmp_path / "o"
    assert run(data, out, [data / "train.json"], "--steps", "1") == 0
    state = out / TR.STATE
    state.write_bytes(state.read_bytes()[:1000])
    msg = last_error(capsys, run(data, out, [data / "train.json"], "--steps", "2", "--resume"))
    assert "is damaged" in msg and "weights_only=False" not in msg


def test_ctrl_c_saves_a_resumable_step(capsys, data, tmp_path, monkeypatch):
    """Ctrl-C saves the steps done, says where, exits 130, and --resume continues from there."""
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
    assert torch.load(out / TR.STATE, weights_only=True)["step"] == 2
    assert run(data, out, [data / "train.json"], "--steps", "5", "--resume") == 0


# --- the input pipeline and stage 1.5's rising resolution -------------------------------------------------

def log_rows(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_workers_give_the_same_losses_and_resume_exactly(data, tmp_path):
    """Decoding in 2 DataLoader workers (1 on a one-CPU machine: --workers is bounded by the CPUs)
    trains on exactly what decoding in the loop does, and a run stopped at step 2 and resumed with
    workers equals the uninterrupted one."""
    base = ["--steps", "4", "--seed", "2", "--lr", "1e-3"]
    workers = str(min(2, OP.cpu_count()))
    assert run(data, tmp_path / "w0", [data / "train.json"], *base, "--workers", "0") == 0
    assert run(data, tmp_path / "w2", [data / "train.json"], *base, "--workers", workers) == 0
    assert run(data, tmp_path / "r", [data / "train.json"], *base, "--workers", workers, "--stop-after", "2") == 0
    assert run(data, tmp_path / "r", [data / "train.json"], *base, "--workers", workers, "--resume") == 0
    losses = [[r["loss"] for r in log_rows(tmp_path / name)] for name in ("w0", "w2", "r")]
    assert losses[0] == losses[1] == losses[2] and len(losses[0]) == 4
    assert all(r["samples_per_s"] > 0 and r["data_s"] >= 0 for r in log_rows(tmp_path / "w2"))


def test_rising_image_sizes(data, tmp_path, monkeypatch):
    """--image-sizes 128,192,256 over 6 steps: steps 1-2 at 128 px (4 image tokens), 3-4 at 192 (9),
    5-6 at 256 (16); a checkpoint saved mid-schedule records its size, and the resumed run continues
    the schedule where it stopped."""
    assert [DA.size_at(s, 6, [128, 192, 256]) for s in range(6)] == [128, 128, 192, 192, 256, 256]
    tokens = []
    real = FV.FastVLM.encode_image

    def counting(self, pixels, timing=None):
        out = real(self, pixels, timing)
        tokens.append((pixels.shape[-1], out.shape[1]))
        return out

    monkeypatch.setattr(FV.FastVLM, "encode_image", counting)
    out = tmp_path / "o"
    sizes = ["--image-sizes", "128,192,256", "--steps", "6", "--batch-size", "2"]
    assert run(data, out, [data / "train.json"], *sizes, "--stop-after", "3") == 0
    assert json.loads((out / "config.json").read_text())["fastvithd"]["image_size"] == 192
    assert run(data, out, [data / "train.json"], "--steps", "6", "--resume") == 0   # the schedule is in the state
    assert [r["image_size"] for r in log_rows(out)] == [128, 128, 192, 192, 256, 256]
    assert sorted(set(tokens)) == [(128, 4), (192, 9), (256, 16)]
    assert json.loads((out / "config.json").read_text())["fastvithd"]["image_size"] == 256


def test_bad_image_sizes(capsys, data, tmp_path):
    """--image-sizes that are not multiples of the encoder's stride are refused in one line."""
    msg = last_error(capsys, run(data, tmp_path / "o", [data / "train.json"], "--image-sizes", "100,128"))
    assert "100 is not a positive multiple of the encoder's stride 64" in msg


def test_held_out_evaluation(capsys, data, tmp_path):
    """--eval-data: the held-out loss and the exact match of short answers, every N steps and at the end,
    in the log beside the training loss and in the plot; the model trains on as if it had not happened."""
    base = ["--steps", "4", "--seed", "4", "--lr", "1e-3"]
    assert run(data, tmp_path / "plain", [data / "train.json"], *base) == 0
    assert run(data, tmp_path / "o", [data / "train.json"], *base, "--eval-data", data / "heldout.json",
               "--eval-every", "2") == 0
    rows = log_rows(tmp_path / "o")
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(r["eval_loss"] > 0 and 0 <= r["eval_exact"] <= 1 and r["eval_asked"] >= 1 for r in evals)
    assert [r["loss"] for r in rows if "loss" in r] == [r["loss"] for r in log_rows(tmp_path / "plain")]
    assert "held-out loss" in capsys.readouterr().err
    assert (tmp_path / "o" / "loss.png").stat().st_size > 1000


@pytest.mark.parametrize("bn_train", [False, True])
def test_grad_checkpoint_gives_the_same_loss_and_gradients(data, bn_train):
    """With activation checkpointing the loss, every gradient and the BatchNorm running statistics are
    those without (the encoder stages are left alone while BatchNorm learns batch statistics)."""
    records = DA.load_records(data / "train.json", data / "images")
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model, tokenizer = TR.build_scratch(records)
        T.set_trainable(model, "2", bn_train)
        if checkpointing:
            assert TR.use_grad_checkpoint(model, bn_train) == 4 + (0 if bn_train else 5)
        ds = DA.Dataset(records, None, tokenizer, 256, 2048)
        loss = T.step_loss(model, [DA.collate([ds[0], ds[1]], 0)], "token", 1)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        stats = {n: b.clone() for n, b in model.named_buffers() if "running" in n}
        results.append((loss, grads, stats))
    (l0, g0, s0), (l1, g1, s1) = results
    assert l0 == l1 and g0.keys() == g1.keys() and len(g0) > 50
    assert all(torch.allclose(g0[n], g1[n], rtol=1e-5, atol=1e-7) for n in g0)
    assert s0.keys() == s1.keys() and all(torch.equal(s0[n], s1[n]) for n in s0)


def test_unwritable_out(capsys, data, tmp_path, monkeypatch):
    """(Checked with os.access, which a root user always passes: simulated here.)"""
    import os

    monkeypatch.setattr(os, "access", lambda path, mode: False)
    msg = last_error(capsys, run(data, tmp_path / "o", [data / "train.json"]))
    assert "is not writable" in msg
