"""LoRA: the layer's math (start = base, merged = unmerged, the update alpha / r B A), what learns in a
--lora run, adapter files in PEFT's layout bound to their base's weights, resume, merge, the dtype of
training, and every refusal in one line. The recipe (a new question type learnt) is in test_lora_recipe.py."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import fastvlm as FV
import qwen2
import shapes_data
import train as T
from support import adapters, loading, training as TR  # noqa: E402
from support.chat import load_image

ROOT = Path(__file__).parent.parent
TINY = ROOT / "models" / "fastvlm-tiny"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corners")
    shapes_data.generate(folder, n_train=32, n_heldout=4, seed=5, types=("corners", "color", "count"))
    return folder


def run_train(data, out, *extra):
    args = ["--stage", "2", "--init", str(TINY), "--data", str(data / "train.json"), "--images", str(data / "images"),
            "--out", str(out), "--batch-size", "4", "--no-progress", "--threads", "1", "--dtype", "float32",
            "--device", "cpu",
            *[str(e) for e in extra]]
    return T.main(args)


LORA = ("--lora", "4", "--lora-lr", "1e-2", "--lora-dropout", "0", "--freeze", "vision_tower", "--lr", "1e-3")


@pytest.fixture(scope="module")
def lora_run(data, tmp_path_factory):
    """Six LoRA steps on the shipped tiny model: adapters on the decoder, the projector in full."""
    out = tmp_path_factory.mktemp("runs") / "lora"
    assert run_train(data, out, *LORA, "--steps", "6", "--eval-data", data / "heldout.json") == 0
    return out


def state(folder):
    return torch.load(Path(folder) / TR.STATE, weights_only=True)


def one_line_error(capsys, code):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def logits_of(model, data):
    """The model's logits (eval mode) for a held-out image and a question about it."""
    image = load_image(data / "images" / "heldout_000000.png")
    pixels = FV.preprocess(image, model.image_size)[None]
    ids = torch.tensor([FV.turn_ids(loading.load_tokenizer(TINY), "How many corners does the red object have?", True)])
    with torch.no_grad():
        return model.eval()(pixels, ids)[0]


# --- the layer ---------------------------------------------------------------------------------------------

def layer(r=4, alpha=8.0, dropout=0.0):
    torch.manual_seed(0)
    base = torch.nn.Linear(32, 24)
    return base, FV.LoRALinear(base, r, alpha, dropout)


def test_a_new_adapter_starts_as_the_base_layer():
    """B starts at zero, so the wrapped layer computes exactly the base layer (bit for bit), while A is
    random: a B initialised randomly, or A at zero (no gradient would ever reach B), fails here."""
    base, lora = layer()
    x = torch.randn(5, 32)
    assert torch.equal(lora(x), base(x)) and base(x).std() > 0.1
    assert lora.lora_A.weight.std() > 0.01 and torch.count_nonzero(lora.lora_B.weight) == 0
    assert lora.lora_A.weight.shape == (4, 32) and lora.lora_B.weight.shape == (24, 4)


def test_the_update_is_alpha_over_r_times_B_A_and_merges_exactly():
    """y = W x + b + (alpha / r) B A x, checked against the formula written out; the merged layer gives
    the same outputs elementwise (float32 rounding), and dropout acts in training only."""
    base, lora = layer(r=4, alpha=12.0, dropout=0.5)
    torch.nn.init.normal_(lora.lora_B.weight, std=0.5)
    x = torch.randn(7, 32)
    lora.eval()
    expected = x @ base.weight.T + base.bias + 3.0 * (x @ lora.lora_A.weight.T @ lora.lora_B.weight.T)
    got = lora(x)
    assert torch.allclose(got, expected, atol=1e-5) and (got - base(x)).abs().max() > 0.1
    merged = lora.merged()
    assert type(merged) is torch.nn.Linear
    assert torch.allclose(merged(x), got, atol=1e-5)
    assert torch.equal(merged.bias, base.bias)
    lora.train()
    torch.manual_seed(1)
    assert not torch.allclose(lora(x), got, atol=1e-3)          # dropout on the adapters' input


def test_adapter_parameter_count_of_the_0_5b_decoder():
    """Rank 128 on the seven projections of Qwen2-0.5B's 24 layers (the figure in fastvlm.py):
    24 x 128 x (896+896 + 896+128 + 896+128 + 896+896 + 3 x (896+4864)) = 70,385,664."""
    with torch.device("meta"):
        model = FV.FastVLM(llm_cfg=qwen2.QWEN2_0_5B)
        names = adapters.add_lora(model, 128, 256)
    assert len(names) == 24 * 7
    count = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    assert count == 70_385_664
    full = sum(m.base_layer.weight.numel() for m in adapters.lora_layers(model).values())
    assert full == 357_826_560


def test_targets_and_ranks_that_cannot_work_are_named():
    model, _, _ = loading.load_model(TINY, fold_batchnorm=False)
    with pytest.raises(adapters.AdapterError, match="'qproj' matches no linear layer"):
        adapters.add_lora(model, 4, 8, names=("q_proj", "qproj"))
    with pytest.raises(adapters.AdapterError, match="rank 65: .* between 1 and 64"):
        adapters.add_lora(model, 65, 8, names=("k_proj",))        # k_proj: 128 -> 64
    with pytest.raises(adapters.AdapterError, match="'lm_head' matches no linear layer"):
        adapters.add_lora(model, 4, 8, names=("lm_head",))        # LLaVA leaves the head out too
    assert not adapters.lora_layers(model)                           # nothing half done
    names = adapters.add_lora(model, 64, 8, names=("k_proj", "mm_projector.2"))
    assert names == ["mm_projector.2"] + [f"llm.layers.{i}.self_attn.k_proj" for i in range(4)]


# --- training ---------------------------------------------------------------------------------------------

def test_only_the_adapters_and_the_projector_learn(lora_run):
    """After six steps: every adapter matrix B moved from zero (and every A from its start), the projector
    (trained in full at --lr) moved, and every other weight is bit-identical to the base's."""
    base, _, _ = loading.load_model(TINY, fold_batchnorm=False)
    trained, _, _ = loading.load_model(TINY, fold_batchnorm=False, adapter=lora_run)
    layers = adapters.lora_layers(trained)
    assert len(layers) == 28
    assert all(torch.count_nonzero(m.lora_B.weight) > 0 for m in layers.values())
    torch.manual_seed(0)                                  # the run's --seed: the A matrices it started from
    start, _, _ = loading.load_model(TINY, fold_batchnorm=False)
    adapters.add_lora(start, 4, 8.0)
    first = adapters.lora_layers(start)
    assert all(not torch.equal(m.lora_A.weight, first[n].lora_A.weight) for n, m in layers.items())
    before = base.state_dict()
    for name, value in trained.state_dict().items():
        if ".lora_" in name:
            continue
        original = before[name.replace(".base_layer.", ".")]
        if name.startswith("mm_projector."):
            assert not torch.equal(value, original), name
        else:
            assert torch.equal(value, original), name
    saved = state(lora_run)
    assert set(saved["model"]) == {n for n, _ in trained.named_parameters()
                                   if ".lora_" in n or n.startswith("mm_projector.")}


def test_the_run_logs_the_two_learning_rates_and_evaluates(lora_run, capsys):
    rows = [json.loads(line) for line in (lora_run / "log.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]    # its own log, not the base's
    assert rows[-1]["eval_exact"] is not None
    optimizer = state(lora_run)["optimizer"]
    assert [g["initial_lr"] for g in optimizer["param_groups"]] == [1e-3, 1e-2]


def test_adapter_files_are_peft_s_layout_and_name_their_base(lora_run):
    config = json.loads((lora_run / adapters.CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8.0
    assert config["target_modules"] == sorted(adapters.DECODER_LAYERS)
    assert config["modules_to_save"] == ["model.mm_projector"]
    assert config["base_model_name_or_path"] == str(TINY)
    with safe_open(str(lora_run / adapters.WEIGHTS), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert "base_model.model.model.layers.3.mlp.down_proj.lora_B.weight" in keys
    assert "base_model.model.model.mm_projector.2.bias" in keys
    assert len(keys) == 28 * 2 + 4
    import hashlib
    assert json.loads(meta["base_model_sha256"]) == {
        "model.safetensors": hashlib.sha256((TINY / "model.safetensors").read_bytes()).hexdigest()}


def test_saved_adapters_give_the_trained_model_s_logits(lora_run, data):
    """The adapters written, loaded onto the base (unmerged, plain or with the speed step) give the logits
    the training model computed, rebuilt here from the training state."""
    run = state(lora_run)
    model, _, _ = loading.load_model(TINY, fold_batchnorm=False)
    adapters.add_lora(model, 4, 8.0)
    model.load_state_dict(run["model"], strict=False)
    expected = logits_of(model, data)
    loaded, _, _ = loading.load_model(TINY, adapter=lora_run)
    assert torch.allclose(logits_of(loaded, data), expected, atol=1e-4) and expected.std() > 1
    plain, _, _ = loading.load_model(TINY, adapter=lora_run, fast=False)
    assert torch.allclose(logits_of(plain, data), expected, atol=1e-4)
    base, _, _ = loading.load_model(TINY, fast=False)
    assert (logits_of(base, data) - expected).abs().max() > 0.1         # the adapters do change it


def test_resumed_lora_run_equals_the_run_straight_through(data, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = (*LORA, "--steps", "4", "--lora-dropout", "0.1")            # dropout's RNG is restored too
    assert run_train(data, straight, *common) == 0
    assert run_train(data, resumed, *common, "--stop-after", "2") == 0
    assert run_train(data, resumed, *common, "--resume") == 0
    a, b = state(straight), state(resumed)
    assert a["step"] == b["step"] == 4 and set(a["model"]) == set(b["model"])
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    with safe_open(str(straight / adapters.WEIGHTS), framework="pt") as f, \
            safe_open(str(resumed / adapters.WEIGHTS), framework="pt") as g:
        assert all(torch.equal(f.get_tensor(k), g.get_tensor(k)) for k in f.keys())


def test_gradient_checkpointing_gives_the_same_adapters(data, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_train(data, a, *LORA, "--steps", "2") == 0
    assert run_train(data, b, *LORA, "--steps", "2", "--grad-checkpoint") == 0
    for name, value in state(a)["model"].items():
        assert torch.allclose(value, state(b)["model"][name], atol=1e-6), name


def test_bfloat16_keeps_the_base_in_bf16_and_what_learns_in_fp32(data, tmp_path, monkeypatch):
    """--dtype bfloat16: the frozen weights are stored in bf16 and the products run under autocast; the
    adapters, the projector and AdamW's moments stay float32; the first step's loss is float32's within
    bf16 rounding, and the adapters written are float32."""
    seen = {}
    real = TR.Run.distribute

    def spy(self, set_trainable):
        model = real(self, set_trainable)
        seen.update({n: p.dtype for n, p in self.core.named_parameters()})
        return model

    monkeypatch.setattr(TR.Run, "distribute", spy)
    assert run_train(data, tmp_path / "bf16", *LORA, "--steps", "2", "--dtype", "bfloat16") == 0
    assert seen["llm.layers.0.self_attn.q_proj.base_layer.weight"] == torch.bfloat16
    assert seen["llm.embed_tokens.weight"] == seen["vision_tower.stem.0.fused.weight"] == torch.bfloat16
    assert seen["llm.layers.0.self_attn.q_proj.lora_A.weight"] == seen["mm_projector.0.weight"] == torch.float32
    moments = state(tmp_path / "bf16")["optimizer"]["state"]
    assert all(s["exp_avg"].dtype == torch.float32 for s in moments.values())
    assert run_train(data, tmp_path / "fp32", *LORA, "--steps", "2") == 0
    losses = [json.loads((tmp_path / f / "log.jsonl").read_text().splitlines()[0])["loss"] for f in ("bf16", "fp32")]
    assert losses[0] == pytest.approx(losses[1], rel=0.03) and losses[0] != losses[1]


def test_auto_dtype_is_bf16_only_for_lora_on_a_cpu_with_bf16_units(data, tmp_path, monkeypatch, capsys):
    from support import speedups

    monkeypatch.setattr(speedups, "bf16_units", lambda *a: True)
    args = ["--stage", "2", "--init", str(TINY), "--data", str(data / "train.json"), "--images", str(data / "images"),
            "--batch-size", "4", "--no-progress", "--threads", "1", "--steps", "1", "--device", "cpu"]
    assert T.main(args + ["--out", str(tmp_path / "a"), *LORA]) == 0
    assert T.main(args + ["--out", str(tmp_path / "b")]) == 0
    err = capsys.readouterr().err
    assert err.count("stage 2: training") == 2 and err.count("bfloat16 (frozen weights stored in bf16") == 1


# --- merged export and the other base layout ---------------------------------------------------------------

def test_merge_writes_the_base_s_layout_with_the_adapters_folded_in(data, tmp_path):
    """--merge: the same files, tensor names and dtypes as the base, loadable without --adapter, giving
    the logits of base + adapters (merging rounds once in float32)."""
    assert run_train(data, tmp_path / "merged", *LORA, "--steps", "3", "--merge") == 0
    assert run_train(data, tmp_path / "adapter", *LORA, "--steps", "3") == 0
    files = {p.name for p in (tmp_path / "merged").iterdir()}
    assert files == {p.name for p in TINY.iterdir()} | {TR.STATE}        # no adapter files
    with safe_open(str(TINY / "model.safetensors"), framework="pt") as f, \
            safe_open(str(tmp_path / "merged" / "model.safetensors"), framework="pt") as g:
        assert set(f.keys()) == set(g.keys())
        assert all(f.get_tensor(k).dtype == g.get_tensor(k).dtype for k in f.keys())
        assert torch.equal(f.get_tensor("model.embed_tokens.weight"), g.get_tensor("model.embed_tokens.weight"))
    merged, _, _ = loading.load_model(tmp_path / "merged", fast=False)
    unmerged, _, _ = loading.load_model(TINY, adapter=tmp_path / "adapter", fast=False)
    a, b = logits_of(merged, data), logits_of(unmerged, data)
    assert torch.allclose(a, b, atol=1e-4) and b.std() > 1


def test_int8_with_an_adapter_merges_it_first(lora_run, data):
    """--quantize int8 quantizes the merged weights: the same model as quantizing a merged checkpoint."""
    model, _, _ = loading.load_model(TINY, adapter=lora_run, quantize="int8")
    assert not adapters.lora_layers(model)
    reference, _, _ = loading.load_model(TINY, adapter=lora_run, fast=False)
    adapters.merge_lora(reference)
    from support import speedups
    speedups.quantize_int8(reference)
    assert torch.equal(model.llm.layers[2].mlp.up_proj.weight, reference.llm.layers[2].mlp.up_proj.weight)


@pytest.fixture(scope="module")
def hf_layout_base(tmp_path_factory):
    sys.path.insert(0, str(ROOT / "tools"))
    import convert
    folder = tmp_path_factory.mktemp("hf") / "tiny-hf"
    convert.convert(TINY, folder)
    return folder


def test_a_base_in_transformers_layout_gets_adapters_and_a_merge_in_that_layout(data, tmp_path, hf_layout_base):
    assert run_train(data, tmp_path / "a", *LORA, "--steps", "2", "--init", hf_layout_base) == 0
    with safe_open(str(tmp_path / "a" / adapters.WEIGHTS), framework="pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.multi_modal_projector.linear_1.weight" in keys
    assert json.loads((tmp_path / "a" / adapters.CONFIG).read_text())["modules_to_save"] == ["model.multi_modal_projector"]
    loaded, _, _ = loading.load_model(hf_layout_base, adapter=tmp_path / "a", fast=False)
    assert run_train(data, tmp_path / "m", *LORA, "--steps", "2", "--init", hf_layout_base, "--merge") == 0
    merged, _, config = loading.load_model(tmp_path / "m", fast=False)
    assert merged.layout == "fast_vlm" and config.get("model_type") == "fast_vlm"
    assert torch.allclose(logits_of(merged, data), logits_of(loaded, data), atol=1e-4)


# --- refusals --------------------------------------------------------------------------------------------

def test_an_adapter_for_other_weights_is_refused_in_one_line(lora_run, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(TINY, other)
    model, _, _ = loading.load_model(other, fold_batchnorm=False)
    with torch.no_grad():
        model.llm.norm.weight.add_(0.01)
    from support.checkpoint import write_safetensors
    write_safetensors(TR.export_tensors(model), other / "model.safetensors")
    proc = subprocess.run([sys.executable, str(ROOT / "infer.py"), str(ROOT / "examples" / "shapes.png"), "Hi",
                           "--model", str(other), "--adapter", str(lora_run)], capture_output=True, text=True, timeout=120)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and "is an adapter for" in err[0] and str(TINY) in err[0], err
    # an adapter made on `other` before its weights changed: the line says so, not "pass --model other"
    moved = tmp_path / "moved"
    shutil.copytree(lora_run, moved)
    config = json.loads((moved / adapters.CONFIG).read_text())
    (moved / adapters.CONFIG).write_text(json.dumps({**config, "base_model_name_or_path": str(other)}))
    with pytest.raises(adapters.AdapterError, match=f"the weights of {other} changed since the adapter"):
        loading.load_model(other, adapter=moved)


DAMAGE = {"truncated weights": "not a readable safetensors", "bad json": "not valid JSON",
          "missing matrix": "layers.1.mlp.up_proj.lora_B.weight", "not lora": "'IA3' adapter", "pickled only": "pickled",
          "r true": "r, lora_alpha or target_modules is missing or not valid", "alpha past float": "(r 4, lora_alpha 1000",
          "pissa": "init_lora_weights = 'pissa' is not supported", "nan matrix": "holds NaN or infinite values",
          "int matrix": "is int32 where the model holds a floating-point tensor",
          "fewer modules named": "a LoRA matrix of a layer that target_modules (q_proj) does not name",
          "missing folder": "does not exist", "a file": "is a file", "a model folder": "is a model folder"}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_adapter_is_refused_in_one_line(lora_run, tmp_path, damage):
    broken = tmp_path / "broken"
    shutil.copytree(lora_run, broken)
    weights, config = broken / adapters.WEIGHTS, broken / adapters.CONFIG
    fields = json.loads(config.read_text())

    def rewrite(change):
        with safe_open(str(weights), framework="pt") as f:
            tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
        from safetensors.torch import save_file
        save_file(change(tensors), str(weights), metadata=meta)

    key = "base_model.model.model.layers.2.self_attn.v_proj.lora_B.weight"
    if damage in ("r true", "alpha past float", "pissa", "fewer modules named"):
        change = {"r true": {"r": True}, "alpha past float": {"lora_alpha": 10 ** 400},
                  "pissa": {"init_lora_weights": "pissa"}, "fewer modules named": {"target_modules": ["q_proj"]}}
        config.write_text(json.dumps({**fields, **change[damage]}))
    elif damage == "nan matrix":
        rewrite(lambda t: {**t, key: t[key].index_fill(0, torch.tensor([3]), float("nan"))})
    elif damage == "int matrix":
        rewrite(lambda t: {**t, key: t[key].to(torch.int32)})
    elif damage == "missing folder":
        shutil.rmtree(broken)
    elif damage == "a file":
        shutil.rmtree(broken)
        broken.write_text("not a folder")
    elif damage == "a model folder":
        shutil.rmtree(broken)
        shutil.copytree(TINY, broken)
    elif damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "bad json":
        config.write_text(config.read_text()[:-5])
    elif damage == "missing matrix":
        with safe_open(str(weights), framework="pt") as f:
            tensors, meta = {k: f.get_tensor(k) for k in f.keys() if "layers.1.mlp.up_proj.lora_B" not in k}, f.metadata()
        from safetensors.torch import save_file
        save_file(tensors, str(weights), metadata=meta)
    elif damage == "not lora":
        config.write_text(json.dumps({**json.loads(config.read_text()), "peft_type": "IA3"}))
    else:
        weights.rename(broken / "adapter_model.bin")
    with pytest.raises(adapters.AdapterError) as e:
        loading.load_model(TINY, adapter=broken)
    message = str(e.value)
    assert "\n" not in message and DAMAGE[damage] in message, message


@pytest.mark.parametrize("extra, message", [
    (("--lora", "0"), "rank must be at least 1"),
    (("--lora", "65"), "rank 65: llm.layers.0.self_attn.k_proj maps 128 -> 64"),
    (("--lora", "4", "--lora-layers", "q_proj,attn"), "'attn' matches no linear layer"),
    (("--lora-lr", "1e-3"), "--lora-lr sets up LoRA adapters: add --lora R"),
    (("--merge",), "--merge sets up LoRA adapters"),
    (("--lora", "4", "--lora-dropout", "1"), "--lora-dropout is a probability"),
    (("--lora", "4", "--fsdp"), "--fsdp with --lora is not supported"),
    (("--lora", "4", "--stage", "1"), "adapters in llm, which --stage 1 keeps frozen"),
    (("--lora", "4", "--freeze", "llm"), "adapters in llm, which --stage 2 keeps frozen (--freeze)"),
    (("--freeze", "vision_tower", "mm_projector", "llm"), "leaves nothing for --stage 2 to train"),
    (("--lora", "4", "--init", "scratch"), "--lora adapts a trained FastVLM"),
])
def test_lora_options_that_cannot_work_get_one_line(capsys, data, tmp_path, extra, message):
    code = run_train(data, tmp_path / "out", "--steps", "1", *extra)
    assert message in one_line_error(capsys, code)
    assert not (tmp_path / "out").exists()


def test_resume_asks_for_the_same_lora_and_the_same_base(capsys, data, tmp_path, lora_run):
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    assert "with --lora 4; pass it again" in one_line_error(capsys, run_train(data, run, "--steps", "8", "--resume"))
    saved = state(run)
    saved["lora"]["base"]["sha256"] = {"model.safetensors": "0" * 64}
    torch.save(saved, run / TR.STATE)
    assert "changed since" in one_line_error(capsys, run_train(data, run, *LORA, "--steps", "8", "--resume"))


def test_serve_and_batch_take_the_adapter(lora_run, tmp_path):
    """serve.py has infer.py's --adapter; infer.py --batch answers as infer.py does with it."""
    import serve
    from support import options

    args = serve.build_parser().parse_args(["--adapter", str(lora_run), "--dtype", "float32"])
    try:
        model = options.load(args)[0]
    finally:
        torch.set_grad_enabled(True)                 # load() turns autograd off for the server's process
    assert len(adapters.lora_layers(model)) == 28
    image = ROOT / "examples" / "shapes.png"
    (tmp_path / "q.jsonl").write_text(json.dumps({"image": str(image), "question": "How many corners does the red "
                                                  "object have?"}) + "\n")
    common = ["--adapter", str(lora_run), "--dtype", "float32", "--max-new-tokens", "4"]
    one = subprocess.run([sys.executable, str(ROOT / "infer.py"), str(image), "How many corners does the red object "
                          "have?", *common], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    batch = subprocess.run([sys.executable, str(ROOT / "infer.py"), "--batch", str(tmp_path / "q.jsonl"), "--out",
                            str(tmp_path / "a.jsonl"), *common], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert one.returncode == batch.returncode == 0, one.stderr + batch.stderr
    assert json.loads((tmp_path / "a.jsonl").read_text())["answer"] == one.stdout.strip()


def test_a_file_in_the_hub_cache_is_named_by_its_blob(tmp_path):
    """huggingface_hub keeps a downloaded file as a blob named by its sha256 (checked on download) and
    links to it: that name is taken, rather than hashing gigabytes at every load; a plain file is hashed."""
    import hashlib

    blobs, snapshot, plain = tmp_path / "blobs", tmp_path / "snapshots" / "main", tmp_path / "plain"
    for folder in (blobs, snapshot, plain):
        folder.mkdir(parents=True)
    name = "ab" * 32
    (blobs / name).write_bytes(b"bytes whose sha256 is not that name")
    (snapshot / "model.safetensors").symlink_to(blobs / name)
    assert adapters.fingerprint(snapshot) == {"model.safetensors": name}
    (plain / "model.safetensors").write_bytes(b"abc")
    assert adapters.fingerprint(plain) == {"model.safetensors": hashlib.sha256(b"abc").hexdigest()}


def test_lora_under_ddp_two_processes_equal_one_process(data, tmp_path):
    """Two gloo processes x batch 2 end where one process x batch 4 ends, adapters and projector alike."""
    common = ["--stage", "2", "--init", str(TINY), "--steps", "3", "--data", str(data / "train.json"),
              "--images", str(data / "images"), "--no-progress", "--threads", "1", "--dtype", "float32", *LORA]
    assert T.main(common + ["--out", str(tmp_path / "single"), "--batch-size", "4"]) == 0
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "train.py"), *common, "--out", str(tmp_path / "ddp"), "--batch-size", "2"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = state(tmp_path / "single")["model"], state(tmp_path / "ddp")["model"]
    assert set(a) == set(b) and len(a) == 28 * 2 + 4
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name
    assert max((a[n] - b[n]).abs().max() for n in a) < 1e-5 < max(a[n].abs().max() for n in a if "lora_B" in n)


def test_the_graphed_decoder_answers_with_adapters_as_the_plain_one(lora_run):
    """A GPU decodes through GraphedQwen2, whose recording is keyed on the first layer's weights: with an
    adapter that layer is a LoRALinear (its weight in base_layer). The stand-in capture of
    test_speedups.py runs the graph path on the CPU: the same tokens as the plain decoder."""
    from test_speedups import graphed

    model, _, _ = loading.load_model(TINY, adapter=lora_run, fast=False)
    fast = graphed(model.llm)
    prompt = torch.randint(0, 300, (1, 9), generator=torch.Generator().manual_seed(0))
    answers = []
    with torch.no_grad():
        for llm in (model.llm, fast):
            llm.setup_cache(64)
            answers.append(qwen2.generate(llm, tokens=prompt, max_new_tokens=12))
    assert answers[0] == answers[1] and ("decode",) in fast._graphs


def test_a_lora_run_as_init_or_model(capsys, data, tmp_path, lora_run):
    """An adapter folder is not a model: --init and --model say how to use it, in one line; a merged run
    is a model like any other (its training state holds the adapters alone, so its files are read)."""
    line = one_line_error(capsys, run_train(data, tmp_path / "x", "--steps", "1", "--init", lora_run))
    assert f"holds LoRA adapters (for {TINY}), not a model: continue it with --resume" in line
    with pytest.raises(loading.CheckpointError, match="holds LoRA adapters, not a model: pass its base model"):
        loading.load_model(lora_run)
    assert run_train(data, tmp_path / "merged", *LORA, "--steps", "1", "--merge") == 0
    assert run_train(data, tmp_path / "full", "--steps", "1", "--init", tmp_path / "merged", "--lr", "1e-4") == 0
    loading.load_model(tmp_path / "full")


def test_a_decoder_trained_in_full_beside_projector_adapters_round_trips(data, tmp_path):
    """Adapters on the projector, the decoder trained in full: modules_to_save names the decoder's own
    modules (not "", which would match every module), and the files give back the trained model."""
    run = tmp_path / "run"
    assert run_train(data, run, *LORA, "--lora-layers", "mm_projector.0,mm_projector.2", "--steps", "2") == 0
    config = json.loads((run / adapters.CONFIG).read_text())
    assert config["modules_to_save"] == ["model.embed_tokens", "model.layers", "model.norm", "lm_head"]
    assert config["target_modules"] == ["model.mm_projector.0", "model.mm_projector.2"]
    model, _, _ = loading.load_model(TINY, fold_batchnorm=False)
    adapters.add_lora(model, 4, 8.0, names=("mm_projector.0", "mm_projector.2"))
    model.load_state_dict(state(run)["model"], strict=False)
    loaded, _, _ = loading.load_model(TINY, adapter=run, fast=False)
    assert torch.allclose(logits_of(loaded, data), logits_of(model, data), atol=1e-5)


def test_resume_refuses_other_lora_options_or_freeze(capsys, data, tmp_path, lora_run):
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    code = run_train(data, run, *LORA, "--lora-dropout", "0.2", "--steps", "8", "--resume")
    assert "LoRA dropout 0.0, not 0.2" in one_line_error(capsys, code)
    code = run_train(data, run, *[a for a in LORA if a not in ("--freeze", "vision_tower")], "--steps", "8", "--resume")
    assert "trained with --freeze vision_tower" in one_line_error(capsys, code)


def test_resume_refuses_another_base(capsys, data, tmp_path, lora_run, hf_layout_base):
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    code = run_train(data, run, *LORA, "--steps", "8", "--resume", "--init", hf_layout_base)
    assert f"adapters belong to {TINY}, not to --init {hf_layout_base}" in one_line_error(capsys, code)
