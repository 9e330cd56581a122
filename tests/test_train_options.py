"""Every option of train.py changes something the user sees (the output, a file, the exit line), every
count has an upper bound that names it, every option's help gives its default, and a write that fails
(a full disk, `ulimit -f`) is one line that loses nothing and blocks nothing.

Options tested elsewhere: --stage, --lr defaults (test_train.py); --data, --images, --eval-data,
--eval-every, --image-sizes, --workers (same losses), --skip-missing-images, --max-length, --steps,
--stop-after, --resume, --out, --init*, --fsdp (test_train.py, test_train_data.py). --device cuda
needs a GPU and is left out."""

import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import shapes_data
import train as T
from support import llava_data as DA, loading, options as OP, training as TR  # noqa: E402

ROOT = Path(__file__).parent.parent
CPUS = OP.cpu_count()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shapes")
    shapes_data.generate(folder, n_train=8, n_heldout=2, seed=7)
    return folder


def run(data, out, *extra, init="scratch"):
    args = ["--stage", "2", "--init", str(init), "--data", str(data / "train.json"), "--images", str(data / "images"),
            "--out", str(out), "--batch-size", "2", "--threads", "1", *[str(e) for e in extra]]
    return T.main(args if "--progress" in extra else args + ["--no-progress"])


def state(folder):
    return torch.load(Path(folder) / TR.STATE, weights_only=True)


def log_rows(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def stage_line(err):
    return next(line for line in err.splitlines() if line.startswith("stage "))


def one_error(capsys, code):
    """The run's only error line: exit 2, no traceback, no exception class names."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(lines) == 1 and err.strip().splitlines()[-1] == lines[0], err
    assert "Traceback" not in err and "Error(" not in err and "Error:" not in err.replace("error: ", ""), err
    return lines[0]


@pytest.fixture(scope="module")
def base(data, tmp_path_factory):
    """One step from scratch: the training-form model most tests below start from."""
    out = tmp_path_factory.mktemp("runs") / "base"
    assert run(data, out, "--steps", "1", "--lr", "1e-3") == 0
    return out


@pytest.fixture(scope="module")
def plain(data, base, tmp_path_factory):
    """Stage 2 from `base` with every option at its default but --lr (the comparisons' reference): one
    epoch of 8 records in micro-batches of 2 is 4 steps."""
    out = tmp_path_factory.mktemp("runs") / "plain"
    assert run(data, out, "--lr", "1e-3", init=base) == 0
    return out


# --- each option changes what the user sees -------------------------------------------------------------

def test_epochs_set_the_number_of_steps(capsys, data, plain, tmp_path):
    """--epochs (default 1): 8 records in micro-batches of 2 are 4 steps an epoch; half an epoch is 2."""
    assert state(plain)["step"] == 4 and len(log_rows(plain)) == 1 + 4        # base's step, then 4
    assert run(data, tmp_path / "half", "--epochs", "0.5", init=plain) == 0
    assert "wrote " + str(tmp_path / "half") + " (step 2 of 2)" in capsys.readouterr().err
    assert [r["step"] for r in log_rows(tmp_path / "half") if r["global_step"] > 5] == [1, 2]


def test_warmup_sets_the_logged_learning_rates(data, base, plain, tmp_path, monkeypatch):
    """--warmup: each log row's lr is the one its step trained at. 4 steps at peak 1e-3: the default
    3 % rounds to 1 warm-up step (the peak at once), then the cosine over the 3 left; --warmup 0.5 is 2
    warm-up steps, 1/2 then 1, then the cosine over 2. The lr is read from the optimizer when it steps:
    a scheduler stepped before the optimizer logs the intended lr but trains at the next step's."""
    lrs = [r["lr"] for r in log_rows(plain)][1:]
    assert lrs == pytest.approx([1e-3, 1e-3, 0.75e-3, 0.25e-3], rel=1e-12)
    stepped, adamw_step = [], torch.optim.AdamW.step

    def recording(self, *a, **k):
        stepped.append(self.param_groups[0]["lr"])
        return adamw_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording)
    assert run(data, tmp_path / "w", "--lr", "1e-3", "--warmup", "0.5", init=base) == 0
    assert [r["lr"] for r in log_rows(tmp_path / "w")][1:] == pytest.approx([0.5e-3, 1e-3, 1e-3, 0.5e-3], rel=1e-12)
    assert stepped == [r["lr"] for r in log_rows(tmp_path / "w")][1:]


def test_each_epoch_reads_the_data_in_the_distributed_samplers_order(data, base, tmp_path, monkeypatch):
    """Two epochs with --seed 3: the records are read in the order of a shuffling DistributedSampler given
    the same 3, at epoch 0, then at epoch 1 (a sampler never told its epoch repeats the first epoch's order;
    one that does not shuffle reads the file in order every epoch)."""
    read = []
    getitem = DA.Dataset.__getitem__
    monkeypatch.setattr(DA.Dataset, "__getitem__", lambda self, i: read.append(i) or getitem(self, i))
    assert run(data, tmp_path / "e", "--lr", "1e-3", "--epochs", "2", "--seed", "3", init=base) == 0
    sampler = torch.utils.data.DistributedSampler(range(8), num_replicas=1, rank=0, shuffle=True, seed=3)
    expected = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        expected.append(list(sampler))
    assert expected[0] != expected[1] and sorted(expected[0]) != expected[0]     # (the checks can fail)
    assert read == expected[0] + expected[1]


def test_the_largest_seed_lasts_the_longest_run():
    """--seed 18446744073709551615 (2**64 - 1) passed, then failed at the epoch boundary with a traceback:
    the sampler draws epoch e's order from --seed + e, past what torch's generators take. MAX_SEED leaves
    room for MAX_STEPS epochs, and no more is needed (at least one step an epoch)."""
    sampler = torch.utils.data.DistributedSampler(range(4), num_replicas=1, rank=0, shuffle=True, seed=OP.MAX_SEED)
    sampler.set_epoch(OP.MAX_STEPS)
    assert sorted(sampler) == [0, 1, 2, 3]
    sampler.seed += 1
    with pytest.raises(ValueError):                   # (torch: "Overflow when unpacking long long")
        list(sampler)


def test_weight_decay_shrinks_each_weight_by_lr_times_decay(data, base, tmp_path):
    """--weight-decay (default 0): AdamW's decoupled decay. One stage-1 step from the same weights with
    decay 0.5 ends, weight by weight, lr x 0.5 x (the weight before) below the step without (the same
    gradient step otherwise); a decay folded into the gradient (Adam's L2) would not."""
    common = ["--stage", "1", "--steps", "1", "--lr", "1e-3"]
    assert T.main([*common, "--init", str(base), "--data", str(data / "train.json"), "--images", str(data / "images"),
                   "--out", str(tmp_path / "d0"), "--batch-size", "2", "--threads", "1", "--no-progress"]) == 0
    assert T.main([*common, "--init", str(base), "--data", str(data / "train.json"), "--images", str(data / "images"),
                   "--out", str(tmp_path / "d5"), "--batch-size", "2", "--threads", "1", "--no-progress",
                   "--weight-decay", "0.5"]) == 0
    before, no_decay, decay = state(base)["model"], state(tmp_path / "d0")["model"], state(tmp_path / "d5")["model"]
    names = [n for n in before if n.startswith("mm_projector.")]
    assert names
    for n in names:
        assert torch.allclose(no_decay[n] - decay[n], 1e-3 * 0.5 * before[n], rtol=1e-3, atol=1e-9), n


def test_clip_changes_the_training(data, base, plain, tmp_path):
    """--clip: the gradient norm is logged before clipping, the weights move after it. Clipped to 1e-6
    (far below the default 1.0), the first step's gradient is below Adam's eps and barely moves the
    weights: the same first gradient norm is logged, the second step's loss is another."""
    assert run(data, tmp_path / "tight", "--steps", "2", "--lr", "1e-3", "--clip", "1e-6", init=base) == 0
    tight, default = log_rows(tmp_path / "tight")[1:], log_rows(plain)[1:]
    assert tight[0]["loss"] == default[0]["loss"] and tight[0]["grad_norm"] == default[0]["grad_norm"] > 1e-3
    assert tight[1]["loss"] != pytest.approx(default[1]["loss"], rel=1e-4)


def test_loss_average_weighs_the_samples(data, base, plain, tmp_path):
    """--loss-average sample gives every conversation equal weight, token (the default) every answer
    token: conversations with answers of different lengths log another first loss."""
    assert run(data, tmp_path / "s", "--steps", "1", "--lr", "1e-3", "--loss-average", "sample", init=base) == 0
    token, sample = log_rows(plain)[1]["loss"], log_rows(tmp_path / "s")[1]["loss"]
    assert token != pytest.approx(sample, rel=1e-4)


def test_bn_chooses_batch_or_running_statistics(capsys, data, base, plain, tmp_path):
    """--bn: from scratch (auto, as `plain` ran) the encoder's BatchNorms train on batch statistics and
    their running statistics move; --bn eval keeps them, and the stage line says so."""
    def stats(folder):
        return {n: v for n, v in state(folder)["model"].items() if n.endswith("running_mean")}

    assert run(data, tmp_path / "eval", "--steps", "1", "--bn", "eval", init=base) == 0
    assert stage_line(capsys.readouterr().err).endswith("BatchNorm eval")
    start, trained, kept = stats(base), stats(plain), stats(tmp_path / "eval")
    assert len(start) > 10
    assert all(torch.equal(start[n], kept[n]) for n in start)
    assert sum(not torch.equal(start[n], trained[n]) for n in start) > 0.9 * len(start)


def test_random_state_option(data, tmp_path):
    """--seed: another value starts a run from scratch from other weights (that the same value repeats
    a run exactly, the resume and workers tests show). One batch of all 8 records, so that the data
    order cannot change the first loss: only the initial weights can."""
    losses = []
    for value in ("0", "1"):
        assert run(data, tmp_path / value, "--steps", "1", "--batch-size", "8", "--seed", value) == 0
        losses.append(log_rows(tmp_path / value)[0]["loss"])
    assert losses[1] != pytest.approx(losses[0], rel=1e-3)


def test_save_every_keeps_a_checkpoint_before_a_failure(capsys, data, base, tmp_path, monkeypatch):
    """--save-every 2: a loss that turns NaN at step 3 finds step 2 saved (and says so); without it the
    run had nothing to keep and leaves no folder."""
    real, calls = T.step_loss, []

    def nan_at_step_3(*a, **k):
        calls.append(1)
        return float("nan") if len(calls) % 4 == 3 else real(*a, **k)

    monkeypatch.setattr(T, "step_loss", nan_at_step_3)
    msg = one_error(capsys, run(data, tmp_path / "saved", "--steps", "3", "--save-every", "2", init=base))
    assert "non-finite at step 3" in msg and "the last checkpoint in" in msg
    assert state(tmp_path / "saved")["step"] == 2
    calls.clear()
    msg = one_error(capsys, run(data, tmp_path / "none", "--steps", "3", init=base))
    assert "no checkpoint was written" in msg and not (tmp_path / "none").exists()


def test_threads_and_progress_bar(capsys, data, base, tmp_path, monkeypatch):
    """--threads sets torch's CPU threads and the stage line says how many (without it, nothing: torch's
    default depends on the machine); without --no-progress a tqdm bar is drawn on stderr, with it none.
    (The run at 2 threads is stopped by a Ctrl-C at its first step: two threads on a busy 2-core machine
    are slow, and the line and the bar are drawn before.)"""
    args = ["--stage", "2", "--init", str(base), "--data", str(data / "train.json"), "--images",
            str(data / "images"), "--batch-size", "2", "--steps", "1"]
    before = torch.get_num_threads()
    try:
        with monkeypatch.context() as patch:
            patch.setattr(T, "step_loss", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
            assert T.main([*args, "--out", str(tmp_path / "a"), "--threads", str(min(2, CPUS))]) == 130
        err = capsys.readouterr().err
        assert f"on cpu ({min(2, CPUS)} thread" in stage_line(err) and "stage 2:   0%|" in err
        assert torch.get_num_threads() == min(2, CPUS)
        assert T.main([*args, "--out", str(tmp_path / "b"), "--threads", "1", "--no-progress"]) == 0
        err = capsys.readouterr().err
        assert "on cpu (1 thread)," in stage_line(err) and "%|" not in err
        assert torch.get_num_threads() == 1
        assert T.main([*args, "--out", str(tmp_path / "c"), "--no-progress"]) == 0
        assert "thread" not in stage_line(capsys.readouterr().err)
    finally:
        torch.set_num_threads(before)


def test_grad_checkpoint_recomputes_and_says_so(capsys, data, base, plain, tmp_path, monkeypatch):
    """--grad-checkpoint: the LLM's 4 layers run through torch's checkpoint (the encoder stages not,
    since from scratch its BatchNorms learn batch statistics), the stage line says so, and the losses
    are those without it."""
    import torch.utils.checkpoint as checkpointing

    real, calls = checkpointing.checkpoint, []

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(checkpointing, "checkpoint", counted)
    assert run(data, tmp_path / "g", "--lr", "1e-3", "--grad-checkpoint", init=base) == 0
    assert stage_line(capsys.readouterr().err).endswith(", activation checkpointing in 4 blocks")
    assert len(calls) == 4 * 4         # 4 layers, 4 steps
    assert [r["loss"] for r in log_rows(tmp_path / "g")] == pytest.approx([r["loss"] for r in log_rows(plain)],
                                                                          rel=1e-6)


def test_tokenizer_data_teaches_the_tokenizer_its_words(data, tmp_path):
    """--tokenizer-data: a from-scratch tokenizer also learns the texts of later stages' data, whose
    words then take fewer tokens; the written tokenizer shows it."""

    word = "zyzzyva"
    extra = [{"id": f"x{i}", "conversations": [{"from": "human", "value": f"{word} {word}?"},
                                               {"from": "gpt", "value": f"{word} {word} {word}"}]} for i in range(40)]
    (tmp_path / "later.json").write_text(json.dumps(extra))
    assert run(data, tmp_path / "without", "--steps", "1") == 0
    assert run(data, tmp_path / "with", "--steps", "1", "--tokenizer-data", tmp_path / "later.json") == 0
    sizes = [len(loading.load_tokenizer(tmp_path / name).encode_text(" " + word)) for name in ("without", "with")]
    assert sizes[1] < sizes[0]


def test_eval_images_is_where_held_out_images_are_read(capsys, data, base, tmp_path):
    """--eval-images: the held-out records' images are read from there (without it, from the first
    --images, where these are not)."""
    folder = tmp_path / "held_out_images"
    folder.mkdir()
    held = json.loads((data / "heldout.json").read_text())
    for r in held:
        shutil.copy(data / "images" / r["image"], folder / ("e_" + r["image"]))
        r["image"] = "e_" + r["image"]
    (tmp_path / "held.json").write_text(json.dumps(held))
    msg = one_error(capsys, run(data, tmp_path / "a", "--steps", "1", "--eval-data", tmp_path / "held.json", init=base))
    assert "e_heldout_000000.png not found" in msg
    assert run(data, tmp_path / "b", "--steps", "1", "--eval-data", tmp_path / "held.json", "--eval-images", folder,
               init=base) == 0
    assert [r["eval_asked"] for r in log_rows(tmp_path / "b") if "eval_loss" in r] == [2]


def test_grad_accum_equals_a_larger_batch(data, base, tmp_path):
    """--grad-accum 2 with micro-batches of 1 trains what micro-batches of 2 train: the same samples
    each step, the same logged loss and gradient norm, the same weights (float32 sums in another order;
    BatchNorm on running statistics, where batch statistics would differ by design)."""
    common = ["--steps", "2", "--lr", "1e-3", "--bn", "eval"]
    assert run(data, tmp_path / "big", *common, init=base) == 0
    assert T.main(["--stage", "2", "--init", str(base), "--data", str(data / "train.json"), "--images",
                   str(data / "images"), "--out", str(tmp_path / "acc"), "--batch-size", "1", "--grad-accum", "2",
                   "--threads", "1", "--no-progress", *common]) == 0
    for x, y in zip(log_rows(tmp_path / "big")[1:], log_rows(tmp_path / "acc")[1:], strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)
    a, b, start = state(tmp_path / "big")["model"], state(tmp_path / "acc")["model"], state(base)["model"]
    for name in a:
        moved = (a[name].float() - start[name].float()).abs().max()
        assert (a[name].float() - b[name].float()).abs().max() <= 1e-2 * moved + 1e-7, name


# --- bounds and help ------------------------------------------------------------------------------------


@pytest.mark.parametrize("option,value,fragment", [
    ("--workers", str(CPUS + 1), f"--workers must be at most {CPUS:,} (the CPUs this process may use"),
    ("--threads", str(CPUS + 1), f"--threads must be at most {CPUS:,} (the CPUs"),
    ("--threads", "0", "--threads must be at least 1"),
    ("--batch-size", "5000", "--batch-size must be at most 4,096 (a step's micro-batches are decoded and held"),
    ("--grad-accum", "3000", "--batch-size x --grad-accum must be at most 4,096 samples"),
    ("--max-length", "40000", "--max-length must be at most 32,768 (Qwen2's context"),
    ("--steps", "20000000", "--steps must be at most 10,000,000 (a guard against typos"),
    ("--save-every", "20000000", "--save-every must be at most 10,000,000"),
    ("--eval-every", "20000000", "--eval-every must be at most 10,000,000"),
    ("--stop-after", "20000000", "--stop-after must be at most 10,000,000"),
    ("--epochs", "1e9", "--epochs must be at most 10,000,000"),
    ("--epochs", "5e6", "--epochs 5e+06 gives 20,000,000 steps, more than 10,000,000"),
    ("--warmup", "1.5", "--warmup is the fraction of the steps that warm up: a number from 0 to 1"),
    ("--warmup", "nan", "--warmup is the fraction"),
    ("--weight-decay", "-0.1", "--weight-decay must be a finite number >= 0"),
    ("--weight-decay", "inf", "--weight-decay must be a finite number >= 0"),
    ("--image-sizes", "64000", "--image-sizes: 64000 is above 4096 px, the largest side a FastViTHD config accepts"),
    ("--image-sizes", "256,128", "--image-sizes 256,128: the sizes must rise"),
    ("--image-sizes", "128,128", "the sizes must rise"),
    ("--image-sizes", "0,128", "--image-sizes: 0 is not a size in pixels"),
    ("--seed", "99999999999999999999", f"--seed must be at most {OP.MAX_SEED:,} (torch's generators take seeds"),
    ("--seed", str(2**64 - 1), f"--seed must be at most {OP.MAX_SEED:,}"),
    ("--seed", "-1", "--seed must be at least 0"),
])
def test_counts_and_sizes_have_upper_bounds(capsys, data, tmp_path, monkeypatch, option, value, fragment):
    """Every count or size an option takes is bounded, in one line that names the bound and why
    (--workers 100000 started about 1,600 processes and filled 24 GB; --image-sizes 64000 reached PIL
    and died there with a MemoryError; falling sizes passed although the help says they rise; --seed
    2**64 - 1 failed at the second epoch with a traceback), and refused before anything loads: the data
    only where the bound needs its record count, the model never (--image-sizes 64000 and --epochs 5e6
    were refused after loading the model, minutes for the 0.5B one)."""
    def never(*a, **k):
        raise AssertionError(f"{option} {value} was refused only after loading")

    monkeypatch.setattr(TR, "initialise", never)
    if "gives" not in fragment:          # the steps an --epochs gives need the data's record count
        monkeypatch.setattr(TR, "load_datasets", never)
    msg = one_error(capsys, run(data, tmp_path / "o", option, value))
    assert fragment in msg
    assert not (tmp_path / "o").exists()


def test_the_largest_image_size_is_the_encoders():
    """MAX_IMAGE_SIZE is the largest side a FastViTHD config accepts: a checkpoint trained at it loads
    again, one beyond it would not."""
    TR.TINY_VISION.__class__(**{**TR.TINY_VISION.__dict__, "image_size": OP.MAX_IMAGE_SIZE})
    with pytest.raises(ValueError):
        TR.TINY_VISION.__class__(**{**TR.TINY_VISION.__dict__, "image_size": OP.MAX_IMAGE_SIZE + 64})


def test_every_option_has_help_with_its_default():
    """--epochs, --grad-accum, --seed, --weight-decay had no help at all; every option says what it
    does and, where it has one, its default (argparse's %(default)s, so the two never disagree)."""
    parser = T.build_parser()
    text = parser.format_help()
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(options) >= 30
    for action in options:
        assert action.help, f"{action.option_strings[0]} has no help"
        if action.default not in (None, False):
            assert "%(default)s" in action.help, f"{action.option_strings[0]}: its help does not give its default"
        elif not action.required and action.nargs != 0:
            assert "default" in action.help, f"{action.option_strings[0]}: its help does not say what happens without it"
    for shown in ("(default: 1.0)", "(default: 0.03)", "(default: 0.0, as LLaVA-1.5)", "(default: 16)", "(default: 1)"):
        assert shown in " ".join(text.split()), shown


# --- a write that fails ---------------------------------------------------------------------------------

def train_with_file_limit(limit, *args):
    """train.py in a child process whose files may not grow past `limit` bytes (`ulimit -f`: Python
    ignores SIGXFSZ, so a write past it fails with EFBIG)."""
    def limit_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, str(ROOT / "train.py"), *[str(a) for a in args]], capture_output=True,
                          text=True, timeout=300, preexec_fn=limit_files, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def only_error_line(proc):
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert proc.returncode == 2 and errors == lines[-1:], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Error" not in proc.stderr.replace("error: ", "")
    return errors[0]


def test_file_size_limit_at_the_first_save_leaves_nothing_that_blocks_a_rerun(data, tmp_path):
    """`ulimit -f` 1 MB: the model's 4.7 MB safetensors fails to write (safetensors' own error, not an
    OSError, so the full-disk check missed it: a traceback, and an --out holding only log.jsonl that
    refused both a rerun and --resume). Now: one line, exit 2, no folder and no temporary folder left;
    the same command without the limit then runs."""
    out = tmp_path / "o"
    args = ["--stage", "2", "--init", "scratch", "--data", data / "train.json", "--images", data / "images",
            "--out", out, "--batch-size", "2", "--steps", "1", "--no-progress", "--threads", "1"]
    msg = only_error_line(train_with_file_limit(2**20, *args))
    assert "file-size limit (ulimit -f)" in msg and "nothing was kept" in msg
    assert list(tmp_path.iterdir()) == []
    assert T.main([str(a) for a in args]) == 0


@contextlib.contextmanager
def file_size_limit(limit):
    """`ulimit -f` for this process, for a moment: its soft limit, put back afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_file_size_limit_at_a_resumed_save_keeps_the_checkpoint(capsys, data, tmp_path):
    """A file-size limit of 8 MB lets the 4.7 MB safetensors through and stops torch.save's training
    state (a RuntimeError from torch whose cause is the EFBIG; in this process, to spare a second
    interpreter: Python ignores SIGXFSZ here too): one line that says --resume, the step-1 checkpoint
    untouched, no temporary folder; --resume without the limit then ends the run, with each step logged
    once (the failed run had logged step 2 before its save failed)."""
    out = tmp_path / "o"
    common = ["--stage", "2", "--data", data / "train.json", "--images", data / "images", "--out", out,
              "--batch-size", "2", "--steps", "2", "--no-progress", "--threads", "1"]
    assert T.main([str(a) for a in [*common, "--init", "scratch", "--stop-after", "1"]]) == 0
    files = {f.name: f.read_bytes() for f in out.iterdir()}
    capsys.readouterr()
    with file_size_limit(8 * 2**20):
        code = T.main([str(a) for a in [*common, "--resume"]])
    msg = one_error(capsys, code)
    assert "file-size limit (ulimit -f)" in msg and "rerun with --resume" in msg and "intact" in msg
    assert [p.name for p in tmp_path.iterdir()] == ["o"]
    assert {f.name: f.read_bytes() for f in out.iterdir() if f.name != "log.jsonl"} == \
        {k: v for k, v in files.items() if k != "log.jsonl"}
    assert T.main([str(a) for a in [*common, "--resume"]]) == 0
    assert [r["global_step"] for r in log_rows(out)] == [1, 2]
    assert state(out)["step"] == 2


def test_full_disk_while_trimming_the_log_on_resume(capsys, data, tmp_path):
    """--resume rewrites log.jsonl without the rows of steps the checkpoint does not hold; a full disk
    there gave a traceback and left log.jsonl.tmp behind. Now: one line that names the log and says the
    checkpoint is intact, the log as it was, no temporary file; --resume then trims and ends the run,
    and a log.jsonl.tmp that a kill left is removed when a run starts (clean_leftovers), nothing else."""
    out = tmp_path / "o"
    common = ["--stage", "2", "--data", data / "train.json", "--images", data / "images", "--out", out,
              "--batch-size", "2", "--steps", "2", "--no-progress", "--threads", "1"]
    assert T.main([str(a) for a in [*common, "--init", "scratch", "--stop-after", "1"]]) == 0
    with open(out / "log.jsonl", "a") as log:          # a step logged but not saved (a killed run)
        log.write(json.dumps({"stage": "2", "step": 2, "global_step": 2, "loss": 1.0}) + "\n")
    before = (out / "log.jsonl").read_bytes()
    capsys.readouterr()
    with file_size_limit(16):                          # the trimmed log is longer than 16 bytes
        code = T.main([str(a) for a in [*common, "--resume"]])
    msg = one_error(capsys, code)
    assert f"while trimming {out / 'log.jsonl'}" in msg and "file-size limit" in msg and "intact" in msg
    assert (out / "log.jsonl").read_bytes() == before and not (out / "log.jsonl.tmp").exists()
    assert T.main([str(a) for a in [*common, "--resume"]]) == 0
    assert not (out / "log.jsonl.tmp").exists() and [r["global_step"] for r in log_rows(out)] == [1, 2]
    kept = {f.name: f.read_bytes() for f in out.iterdir()}
    (out / "log.jsonl.tmp").write_text("left by a kill\n")
    TR.clean_leftovers(out)                             # what every run does first
    assert {f.name: f.read_bytes() for f in out.iterdir()} == kept


# --- what --skip-missing-images reports -----------------------------------------------------------------

def test_skipped_records_are_counted_once_each(capsys, data, tmp_path):
    """Three bad records: two whose image is missing (found at the start) and one whose PNG is cut short
    (its header reads, its pixels do not: found when it is first trained on). Over 3 epochs the broken
    one comes round 3 times; it used to be counted each time ("2 images skipped" at the start, "4 records
    left out" at the end). The summary line counts what the start found, the last note the records left
    out, each once, and how the two numbers add up."""
    images = tmp_path / "images"
    images.mkdir()
    recs = json.loads((data / "train.json").read_text())[:4]
    for r in recs:
        shutil.copy(data / "images" / r["image"], images / r["image"])
    broken = images / recs[3]["image"]
    broken.write_bytes(broken.read_bytes()[:200])
    gone = [{**r, "id": f"gone{i}", "image": f"nope{i}.png"} for i, r in enumerate(recs[:2])]
    (tmp_path / "d.json").write_text(json.dumps(recs + gone))
    code = T.main(["--stage", "2", "--init", "scratch", "--data", str(tmp_path / "d.json"), "--images", str(images),
                   "--out", str(tmp_path / "o"), "--batch-size", "2", "--epochs", "3", "--skip-missing-images",
                   "--no-progress", "--threads", "1"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "data: d.json: 4 records (2 images skipped)" in err
    assert ("note: 3 records were left out: 2 skipped at the start (image missing or unreadable) and 1 whose "
            "image failed to decode during training") in err
    assert state(tmp_path / "o")["decode_failed"] == [3]
