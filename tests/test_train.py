"""train.py: freezing per stage, label masking, learning, DDP = one process, exact resume, bad data."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastvlm as FV
import qwen2
import shapes_data
import train as T
from support import chat as CH, llava_data as DA, loading, training as TR  # noqa: E402

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shapes")
    shapes_data.generate(folder, n_train=48, n_heldout=4, seed=3)
    return folder


def run_train(data, out, *extra):
    args = ["--data", str(data / "train.json"), "--images", str(data / "images"), "--out", str(out),
            "--batch-size", "2", "--no-progress", "--threads", "1", *[str(e) for e in extra]]
    return T.main(args)


def state(folder):
    return torch.load(Path(folder) / TR.STATE, weights_only=True)


@pytest.fixture(scope="module")
def base_run(data, tmp_path_factory):
    """One stage-2 step from scratch: a training-form model with its state, the start of the other tests."""
    out = tmp_path_factory.mktemp("runs") / "base"
    assert run_train(data, out, "--stage", "2", "--init", "scratch", "--steps", "1", "--lr", "1e-3") == 0
    return out


# The recipe, each number beside its source. The paper (Sec. 4.1) follows LLaVA-1.5, whose scripts give
# the numbers it leaves out: scripts/v1_5/pretrain.sh (stage 1) and scripts/v1_5/finetune.sh (stage 2).
RECIPE = {   # stage: (the parts that learn, peak learning rate)
    "1": ({"mm_projector"}, 1e-3),    # Sec. 4.1: projector only; pretrain.sh --tune_mm_mlp_adapter True --learning_rate 1e-3
    "1.5": ({"vision_tower", "mm_projector"}, 2e-5),    # Sec. 4.1, as train.py's docstring states it: encoder + projector
    "2": ({"vision_tower", "mm_projector", "llm"}, 2e-5),   # Sec. 4.1: every module; finetune.sh --learning_rate 2e-5
    "0": ({"vision_tower", "mm_projector", "llm"}, 1e-3),   # not in the paper: train.py's from-scratch stage
}


def test_default_options_are_llava_1_5s():
    """Every test passes --lr and most pass their own schedule, so a wrong default would train every
    user's run wrongly and no test would notice. The defaults against their sources."""
    args = T.build_parser().parse_args(["--stage", "2", "--data", "d.json", "--images", "i", "--out", "o"])
    assert args.lr is None                      # the stage's: RECIPE above
    assert args.epochs == 1.0                   # pretrain.sh and finetune.sh: --num_train_epochs 1
    assert args.warmup == 0.03                  # both: --warmup_ratio 0.03 (and --lr_scheduler_type cosine)
    assert args.weight_decay == 0.0             # both: --weight_decay 0.
    assert args.clip == 1.0                     # transformers' TrainingArguments max_grad_norm, which LLaVA keeps
    assert args.max_length == 2048              # both: --model_max_length 2048
    assert args.batch_size == 16                # finetune.sh: --per_device_train_batch_size 16 (x 8 GPUs = 128);
                                                # pretrain.sh uses 32 (x 8 = 256): pass --batch-size 32 for stage 1
    assert args.grad_accum == 1                 # finetune.sh: --gradient_accumulation_steps 1
    assert args.loss_average == "token"         # LLaVA's loss: cross-entropy averaged over the answer tokens
    assert {stage: (set(parts), lr) for stage, (parts, lr) in T.STAGES.items()} == RECIPE


@pytest.mark.parametrize("stage", sorted(RECIPE))
def test_each_stage_trains_exactly_its_parts_at_its_default_lr(capsys, data, base_run, tmp_path, stage):
    """One real step of each stage with no --lr: the frozen parts come out bit-identical; each trained
    part moves, and by the stage's learning rate: Adam's first step moves every weight by lr x g / (|g|
    + eps), so the largest move of a part is the lr itself (a one-step run warms up in that step).
    The optimizer state holds AdamW's other settings (transformers' defaults, as LLaVA's trainer uses
    them), and the stage line says what trains."""
    learns, lr = RECIPE[stage]
    out = tmp_path / "run"
    assert run_train(data, out, "--stage", stage, "--init", base_run, "--steps", "1") == 0
    line = next(l for l in capsys.readouterr().err.splitlines() if l.startswith(f"stage {stage}: "))
    assert f", lr {lr:g}, " in line
    before, after = state(base_run)["model"], state(out)["model"]
    assert before.keys() == after.keys()
    for part in ("vision_tower", "mm_projector", "llm"):
        names = [n for n in before if n.startswith(part + ".")]
        if part not in learns:
            assert all(torch.equal(before[n], after[n]) for n in names), f"stage {stage} changed the frozen {part}"
            continue
        weights = [n for n in names if not n.endswith(("running_mean", "running_var", "num_batches_tracked"))]
        moved = [n for n in weights if not torch.equal(before[n], after[n])]
        assert len(moved) > 0.9 * len(weights), f"stage {stage}: only {len(moved)}/{len(weights)} of {part} moved"
        largest = max((after[n].double() - before[n].double()).abs().max().item() for n in weights)
        assert largest == pytest.approx(lr, rel=1e-2), f"stage {stage}: {part} moved by up to {largest:g}"
    group = state(out)["optimizer"]["param_groups"][0]
    assert (group["initial_lr"], group["betas"], group["eps"], group["weight_decay"]) == (lr, (0.9, 0.999), 1e-8, 0.0)
    trained = sum({v.data_ptr(): v.numel() for n, v in before.items() if n.split(".")[0] in learns   # (tied: once)
                   and not n.endswith(("running_mean", "running_var", "num_batches_tracked"))}.values())
    assert line.startswith(f"stage {stage}: training {trained:,} of ")


def test_special_token_strings_in_training_text_are_text(base_run):
    """Data text is only text, as a user's is: a `<|im_end|>` written inside an answer is learnt as its
    characters, so the answer's one control `<|im_end|>` is the renderer's, at its end."""
    _, tokenizer = TR.model_from_state(state(base_run), base_run)
    end = tokenizer.token_id("<|im_end|>")
    ids, labels = FV.conversation_ids(tokenizer, [("Say it.", "the <|im_end|> token")])
    learnt = [l for l in labels if l != -100]
    assert learnt.count(end) == 1 and learnt[-1] == end
    assert tokenizer.decode(learnt[:-1], skip_special_tokens=False) == "the <|im_end|> token"


def test_labels_cover_only_the_answers_and_their_end_marker(base_run):
    """The loss covers each answer and its <|im_end|> (LLaVA's masking), never the prompt, the template or the
    image: a mask that learns the questions trains the model to ask them, one that misses <|im_end|> never
    learns to stop."""
    _, tokenizer = TR.model_from_state(state(base_run), base_run)
    turns = [{"from": "human", "value": "<image>\nHow many shapes are there?"}, {"from": "gpt", "value": "2"},
             {"from": "human", "value": "Describe the image."}, {"from": "gpt", "value": "a red circle and a blue square"}]
    ids, labels = FV.conversation_ids(tokenizer, DA.exchanges(turns))
    learnt = [i for i, l in zip(ids, labels) if l != -100]
    assert tokenizer.decode(learnt, skip_special_tokens=False) == "2<|im_end|>a red circle and a blue square<|im_end|>"
    assert all(l == -100 for i, l in zip(ids, labels) if i == FV.IMAGE_TOKEN_INDEX)
    # Apple's `qwen_2` template, written out: the image marker moved before the question, on its own line
    template = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\nHow many "
                "shapes are there?<|im_end|>\n<|im_start|>assistant\n2<|im_end|>\n<|im_start|>user\nDescribe the "
                "image.<|im_end|>\n<|im_start|>assistant\na red circle and a blue square<|im_end|>\n")
    before, after = template.split("<image>")
    assert ids == tokenizer.encode(before) + [FV.IMAGE_TOKEN_INDEX] + tokenizer.encode(after)
    # through the model, the image positions are masked too
    model, _ = TR.model_from_state(state(base_run), base_run)
    pixels = torch.rand(1, 3, 256, 256)
    logits, spread = model(pixels, torch.tensor([ids]), torch.tensor([labels]))
    at = ids.index(FV.IMAGE_TOKEN_INDEX)
    assert logits.shape[1] == spread.shape[1] == len(ids) - 1 + 16
    assert (spread[0, at:at + 16] == -100).all()
    assert (spread[0] != -100).sum() == len(learnt)


def test_a_few_steps_on_a_fixed_batch_reduce_the_loss(data):
    """Eight steps on one fixed batch cut its loss: a loss cut off from the weights (detached, wrong labels,
    everything frozen) would not fall."""
    records = DA.load_records(data / "train.json", data / "images")
    torch.manual_seed(0)
    model, tokenizer = TR.build_scratch(records)
    dataset = DA.Dataset(records, data / "images", tokenizer, 256, 2048)
    batch = DA.collate([dataset[i] for i in range(4)], 0)
    T.set_trainable(model, "2", bn_train=True)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(8):
        losses.append(T.step_loss(model, [batch], "token", world=1))
        opt.step()
        opt.zero_grad()
    assert losses[-1] < 0.6 * losses[0], losses


def test_resume_continues_exactly(data, base_run, tmp_path):
    """A run stopped at step 2 and resumed ends bit-identical to the run straight through (optimizer,
    scheduler, RNG and data position restored), and its log has each step once."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ["--stage", "2", "--init", base_run, "--steps", "4", "--lr", "1e-3"]
    assert run_train(data, straight, *common) == 0
    assert run_train(data, resumed, *common, "--stop-after", "2") == 0
    assert state(resumed)["step"] == 2
    assert run_train(data, resumed, "--stage", "2", "--steps", "4", "--lr", "1e-3", "--resume") == 0
    a, b = state(straight), state(resumed)
    assert a["step"] == b["step"] == 4
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    logged = [json.loads(l)["global_step"] for l in (resumed / "log.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4, 5]          # the base run's step, then this run's four, once each


@pytest.mark.parametrize("how", ["ddp", "fsdp"])
def test_ddp_two_processes_equal_one_process(data, base_run, tmp_path, how):
    """Two gloo processes x batch 2 end exactly where one process x batch 4 ends, with the model
    replicated (DDP) or sharded (FSDP2, --fsdp: its checkpoint gathered into the official layout)."""
    common = ["--stage", "2", "--init", str(base_run), "--steps", "3", "--lr", "1e-3", "--bn", "eval",
              "--data", str(data / "train.json"), "--images", str(data / "images"), "--no-progress", "--threads", "1"]
    single = tmp_path / "single"
    assert T.main(common + ["--out", str(single), "--batch-size", "4"]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # --standalone: the launcher's own store binds a free port and keeps it, so no other process can
    # take the port between choosing and binding it (a socket bound, closed and its port passed on could)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "train.py"),
                           *common, "--out", str(tmp_path / "ddp"), "--batch-size", "2",
                           *(["--fsdp"] if how == "fsdp" else [])],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b, start = state(single)["model"], state(tmp_path / "ddp")["model"], state(base_run)["model"]
    moved = 0
    for name in a:
        step = (a[name].float() - start[name].float()).abs().max()
        # Adam's updates are about lr per step; float reduction order perturbs them by ~1e-6
        assert (a[name].float() - b[name].float()).abs().max() <= 1e-2 * step + 1e-7, name
        moved += bool(step > 0)
    assert moved > 50
    # Adam hides a uniformly wrong gradient scale, the logged loss and gradient norm do not
    logs = [[json.loads(l) for l in (f / "log.jsonl").read_text().splitlines()] for f in (single, tmp_path / "ddp")]
    for x, y in zip(*logs):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)


def test_checkpoint_loads_and_answers_through_infer(base_run, data):
    """What train.py writes is a checkpoint infer.py loads and answers from (the official layout, fused),
    its weights readable as its other files are (safetensors alone writes them owner-only, 0o600)."""
    from support.checkpoint import new_file_mode

    modes = {f.name: f.stat().st_mode & 0o777 for f in base_run.iterdir() if f.is_file()}
    assert modes["model.safetensors"] == modes["config.json"] == new_file_mode(), modes
    model, tokenizer, config = loading.load_model(base_run)
    assert model.vision_tower.is_fused and config["fastvithd"]["image_size"] == 256
    proc = subprocess.run([sys.executable, str(ROOT / "infer.py"), str(data / "images" / "heldout_000000.png"),
                           "How many shapes are there?", "--model", str(base_run), "--max-new-tokens", "3"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.inference
def test_exported_model_computes_what_the_trained_model_computed(base_run, data):
    """The exported folder (encoder fused, BatchNorm folded on load) against the training-form model it
    came from: first-step logits elementwise, and 12 greedy tokens decoded past any stop token (after one
    step both models answer the stop token first, so comparing answer texts would compare two empty
    strings)."""
    from tolerance import assert_close

    exported, tokenizer, _ = loading.load_model(base_run)
    trained, _ = TR.model_from_state(state(base_run), base_run)
    trained.eval()
    image = CH.load_image(data / "images" / "heldout_000000.png")
    ids = FV.turn_ids(tokenizer, "How many shapes are there?", first=True)
    pixels = FV.preprocess(image, exported.image_size)[None]
    runs = []
    for model in (exported, trained):
        embeds = model.embed(ids, model.encode_image(pixels))
        logits = model.llm(embeds=embeds)[0, -1]
        model.llm.setup_cache(embeds.shape[1] + 12)
        tokens, _ = qwen2.generate(model.llm, embeds=embeds, max_new_tokens=12, stop_ids=())
        runs.append((logits, tokens))
    (a, tokens_a), (b, tokens_b) = runs
    assert_close(a, b, rtol=1e-4, atol=1e-4, what="exported vs trained logits", min_std=0.1)
    assert tokens_a == tokens_b and len(tokens_a) == 12


def test_tied_export_writes_no_head_and_untied_does(base_run):
    """Official tied checkpoints store no `lm_head.weight` (save_pretrained drops the tied copy); an
    untied model must write its own head, or the reloaded model would tie what was trained apart."""
    model, _ = TR.model_from_state(state(base_run), base_run)
    assert model.llm.cfg.tie_word_embeddings
    tied = TR.export_tensors(model)
    assert "lm_head.weight" not in tied and "model.embed_tokens.weight" in tied
    untied_cfg = qwen2.Qwen2Config(**{**model.llm.cfg.__dict__, "tie_word_embeddings": False})
    untied = FV.FastVLM(model.vision_tower.cfg, untied_cfg, fused=False)
    untied.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        untied.llm.lm_head.weight.mul_(2)
    out = TR.export_tensors(untied)
    assert torch.equal(out["lm_head.weight"], 2 * out["model.embed_tokens.weight"])


# --- bad input -------------------------------------------------------------------------------------------

def one_line_error(capsys, code):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ")
    return err[0]


def write_data(tmp_path, records):
    (tmp_path / "d.json").write_text(json.dumps(records) if not isinstance(records, str) else records)
    return tmp_path / "d.json"


def good_record(data):
    return json.loads((data / "train.json").read_text())[0]


def test_bad_data_is_named(capsys, data, tmp_path):
    """Bad data files and records stop the run in one line that names the file, the record and its id,
    before anything is written."""
    def run(path, *extra):
        return T.main(["--stage", "2", "--init", "scratch", "--data", str(path), "--images", str(data / "images"),
                       "--out", str(tmp_path / "o"), "--no-progress", *extra])

    assert "data file not found" in one_line_error(capsys, run(tmp_path / "none.json"))
    assert "not valid JSON" in one_line_error(capsys, run(write_data(tmp_path, "[{oops")))
    rec = good_record(data)
    bad = [rec, {**rec, "id": "x7", "image": "missing.png"}]
    msg = one_line_error(capsys, run(write_data(tmp_path, bad)))
    assert "record 1 (id 'x7')" in msg and "missing.png" in msg
    no_answer = [rec, {**rec, "id": "q", "conversations": [{"from": "human", "value": "<image>\nhi"}]}]
    assert "no assistant" in one_line_error(capsys, run(write_data(tmp_path, no_answer)))
    assert "needs 'conversations'" in one_line_error(capsys, run(write_data(tmp_path, [{"id": 1}])))
    # a second <image> in a later turn used to be embedded silently as token 0
    turns = rec["conversations"][:2] + [{"from": "human", "value": "<image>\nAnd this one?"},
                                        {"from": "gpt", "value": "no"}]
    msg = one_line_error(capsys, run(write_data(tmp_path, [rec, {**rec, "id": "two", "conversations": turns}])))
    assert "record 1 (id 'two')" in msg and "turn 2" in msg and "one image per conversation" in msg


def test_unreadable_image_names_the_record(capsys, data, tmp_path):
    """A file that is no image is named with its record, and nothing is written."""
    images = tmp_path / "images"
    images.mkdir()
    rec = good_record(data)
    (images / rec["image"]).write_bytes(b"not a png")
    code = T.main(["--stage", "2", "--init", "scratch", "--data", str(write_data(tmp_path, [rec] * 4)),
                   "--images", str(images), "--out", str(tmp_path / "o"), "--batch-size", "2", "--no-progress"])
    msg = one_line_error(capsys, code)
    assert "record 0" in msg and "not a readable image" in msg
    assert not (tmp_path / "o").exists()        # nothing written


def test_resume_without_state_and_mismatched_init(capsys, data, tmp_path, base_run):
    """--resume without a training state, and an --init folder whose config disagrees with its weights,
    get one line each."""
    code = run_train(data, tmp_path / "fresh", "--stage", "2", "--resume")
    assert "--resume" in one_line_error(capsys, code)
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in base_run.iterdir():
        if f.name != TR.STATE:
            (broken / f.name).write_bytes(f.read_bytes())
    config = json.loads((broken / "config.json").read_text())
    config["hidden_size"] = 256
    (broken / "config.json").write_text(json.dumps(config))
    msg = one_line_error(capsys, run_train(data, tmp_path / "o2", "--stage", "2", "--init", broken, "--steps", "1"))
    assert "config.json and the weights disagree" in msg


def test_long_samples_are_truncated_and_counted(capsys, data, tmp_path):
    """Samples longer than --max-length are truncated, as LLaVA truncates at model_max_length, and the
    user is told how many."""
    assert run_train(data, tmp_path / "o", "--stage", "2", "--init", "scratch", "--steps", "1",
                     "--max-length", "40") == 0
    assert "were truncated" in capsys.readouterr().err


# --- the shipped model ------------------------------------------------------------------------------------

@pytest.mark.inference
def test_shipped_tiny_model_reads_the_image():
    """The shipped tiny model answers from the image (>= 90 % of fresh questions), not from the question
    alone (<= 45 % without it)."""
    model, tokenizer, _ = loading.load_model(ROOT / "models" / "fastvlm-tiny")
    seen, per_type, _ = shapes_data.evaluate(model, tokenizer, samples=200, seed=2024, progress=False)
    blind, _, _ = shapes_data.evaluate(model, tokenizer, samples=200, seed=2024, blind=True, progress=False)
    assert seen >= 0.90, per_type
    assert blind <= 0.45, "without the image the model should be near chance"


def test_init_from_hf_qwen2_plus_fastvlm_vision_tower(data, tmp_path):
    """--init-llm (an HF Qwen2 folder) + --init-vision (a FastVLM folder): a new projector joins them."""
    import qwen2 as Q
    from synthetic import SMALL_LLM, synthetic_llm_tensors, write_fastvlm_checkpoint, write_official_tokenizer
    from safetensors.torch import save_file

    vision = write_fastvlm_checkpoint(tmp_path / "vlm", vision_cfg=TR.TINY_VISION)
    llm_dir = write_official_tokenizer(tmp_path / "qwen2")
    cfg = Q.Qwen2Config.from_dict(SMALL_LLM)
    save_file(synthetic_llm_tensors(cfg), str(llm_dir / "model.safetensors"))
    (llm_dir / "config.json").write_text(json.dumps({"model_type": "qwen2", **SMALL_LLM}))
    out = tmp_path / "joined"
    assert T.main(["--stage", "1", "--init-llm", str(llm_dir), "--init-vision", str(vision), "--data",
                   str(data / "train.json"), "--images", str(data / "images"), "--out", str(out),
                   "--batch-size", "2", "--steps", "1", "--no-progress"]) == 0
    model, tokenizer, _ = loading.load_model(out)
    reference, _, _ = loading.load_model(vision)
    assert len(tokenizer) == 151646
    llm = loading.load_qwen2(llm_dir)
    assert torch.equal(model.llm.layers[1].mlp.up_proj.weight, llm.layers[1].mlp.up_proj.weight)
    assert torch.equal(model.vision_tower.stages[4].cpe.fused.weight, reference.vision_tower.stages[4].cpe.fused.weight)
