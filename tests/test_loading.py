"""Loading a model folder: what config.json says against what the files hold, compared before anything is
allocated; every config field read, fixed to its one value, or documented as ignored; the tied head as
stored; and questions measured before they are tokenized."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import unicodedata
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastvlm as FV
import infer
from support.checkpoint import CheckpointError
from synthetic import OFFICIAL_CONFIG, REFERENCE
from support import chat as CH, loading  # noqa: E402
from synthetic import SMALL_LLM  # noqa: E402

pytestmark = pytest.mark.inference
ROOT = Path(__file__).parent.parent
TINY = ROOT / "models" / "fastvlm-tiny"            # train.py's output: tied, 377 tokens, context 1024
IMAGE = Path(__file__).parent / "fixtures" / "e2e_image.png"
TRANSFORMERS_CONFIG = json.loads((REFERENCE / "transformers_fast_vlm_0.5b_config.json").read_text())


@pytest.fixture(scope="module")
def tiny():
    return loading.load_model(TINY, fast=False)


def copy_with_config(source, folder, change):
    """A copy of the model folder `source` whose config.json `change` (a function of the dict) edits."""
    shutil.copytree(source, folder)
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def config_only(folder, config):
    """A folder holding config.json alone: enough for loading.model_config, which reads nothing else."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def one_line_error(capsys, *args):
    code = infer.main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith("error: "), err
    return err


def logits(model, tokenizer, text="What is in the picture? A red square."):
    return model.llm(tokens=torch.tensor([tokenizer.encode(text)]))[0]


# --- config.json against the files, before anything is allocated ------------------------------------------

def test_a_config_of_a_far_larger_model_is_named_before_anything_is_allocated(tmp_path, monkeypatch, capsys):
    """Every field within its bounds, together over 1 TiB of weights: infer.py used to allocate them before
    comparing one shape (an allocator traceback). The stored shapes (headers only) are now compared first:
    the first tensor that disagrees is named, and nothing is allocated; load_qwen2 (train.py --init-llm)
    compares before it reads a tensor."""
    huge = dict(hidden_size=2**16, intermediate_size=2**18, num_hidden_layers=8, num_attention_heads=2**10,
                num_key_value_heads=2**10)
    folder = copy_with_config(TINY, tmp_path / "m", lambda c: c.update(huge))
    _, vision_cfg, llm_cfg, _ = loading.model_config(folder)
    with torch.device("meta"):
        assert loading.model_bytes(FV.FastVLM(vision_cfg, llm_cfg)) > 2**40

    def allocator(*args, **kwargs):
        raise AssertionError("memory allocated before the stored shapes were compared")

    monkeypatch.setattr(loading, "allocate", allocator)
    err = one_line_error(capsys, IMAGE, "What is it?", "--model", folder)
    assert "'model.embed_tokens.weight'" in err and "has shape (377, 128) but the config gives (377, 65536)" in err

    llm = config_only(tmp_path / "qwen2", {"model_type": "qwen2", **llm_cfg.__dict__})
    save_file({k: v for k, v in load_file(str(TINY / "model.safetensors")).items() if k.startswith("model.layers.")
               or k in ("model.embed_tokens.weight", "model.norm.weight")}, str(llm / "model.safetensors"))
    monkeypatch.setattr(loading, "read_safetensors", allocator)
    with pytest.raises(CheckpointError, match=r"'model\.embed_tokens\.weight'.*\(377, 128\) but the config gives"):
        loading.load_qwen2(llm)


@pytest.mark.parametrize("field,value,fragment", [
    ("hidden_size", 256, "'model.embed_tokens.weight' (ours: llm.embed_tokens.weight) has shape (377, 128) but "
                         "the config gives (377, 256)"),
    ("intermediate_size", 512, "mlp.down_proj.weight' (ours: llm.layers.0.mlp.down_proj.weight) has shape (128, 384)"),
    ("num_hidden_layers", 5, "missing tensor 'model.layers.4."),
    ("num_hidden_layers", 3, "unexpected tensor 'model.layers.3."),
    ("num_key_value_heads", 4, "self_attn.k_proj.bias' (ours: llm.layers.0.self_attn.k_proj.bias) has shape (64,)"),
    ("vocab_size", 400, "'model.embed_tokens.weight' (ours: llm.embed_tokens.weight) has shape (377, 128)"),
])
def test_a_shape_field_that_disagrees_names_the_key(field, value, fragment, tmp_path, capsys):
    """Each field that sizes a weight, set to another value than the file was written with, is refused with
    the file's key (not the model's name alone), before any allocation."""
    folder = copy_with_config(TINY, tmp_path / "m", lambda c: c.update({field: value}))
    assert fragment in one_line_error(capsys, IMAGE, "What is it?", "--model", folder)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weights_too_big_for_the_memory_are_refused_in_one_line(dtype, monkeypatch):
    """What the memory check counts is what loading takes (a tied head once, floating tensors in the dtype
    asked for), and a model that needs more than is free is refused before it is allocated, with the way
    out (bfloat16 halves a float32 model); one that needs exactly what is free loads."""
    model, _, _ = loading.load_model(TINY, dtype=dtype, fold_batchnorm=False, fast=False)
    taken = sum(t.nbytes for t in {t.data_ptr(): t for t in model.state_dict().values()}.values())
    with torch.device("meta"):
        skeleton = FV.FastVLM(*loading.model_config(TINY)[1:3])
    assert loading.model_bytes(skeleton, dtype) == taken
    monkeypatch.setattr(loading, "free_memory", lambda device: taken - 1)
    with pytest.raises(CheckpointError) as refused:
        loading.load_model(TINY, dtype=dtype)
    message = str(refused.value)
    kind = str(dtype).removeprefix("torch.")
    assert f"needs {loading.size_text(taken)} in {kind} but this machine has {loading.size_text(taken - 1)} free" in message
    assert ("load it in bfloat16 (--dtype bfloat16)" in message) == (dtype == torch.float32)
    monkeypatch.setattr(loading, "free_memory", lambda device: taken)
    loading.load_model(TINY, dtype=dtype, fold_batchnorm=False, fast=False)


def test_free_memory_is_the_machines():
    """The free memory compared with is in bytes, near what the kernel calls available (the two are read
    a moment apart) and at most all there is."""
    info = {k: int(v.split()[0]) * 1024 for k, v in
            (line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
            if v.strip().endswith("kB")}
    free = loading.free_memory(torch.device("cpu"))
    assert info["MemAvailable"] // 2 <= free <= info["MemTotal"] + info.get("SwapTotal", 0)


def test_a_folder_without_config_json_says_so(tmp_path, capsys):
    """The missing file used to be reported as 'config.json is not valid JSON ... re-download it' (the
    'no config.json' error, a ValueError, was caught again by the JSON handler)."""
    folder = shutil.copytree(TINY, tmp_path / "m")
    (folder / "config.json").unlink()
    err = one_line_error(capsys, IMAGE, "What is it?", "--model", folder)
    assert f"{folder} has no config.json" in err and "JSON" not in err and "re-download" not in err


# --- the tied head, as stored ------------------------------------------------------------------------------

def test_the_file_decides_whether_the_head_is_tied(tmp_path, tiny):
    """Apple warns that some checkpoints' tie_word_embeddings disagrees with their files (reference notes):
    a config that says untied beside a file with no lm_head.weight loads tied, and the same answers; one
    that says tied beside a file that has lm_head.weight loads that head, untied."""
    model, tokenizer, _ = tiny
    untied_says = copy_with_config(TINY, tmp_path / "untied-says", lambda c: c.update(tie_word_embeddings=False))
    loaded, _, _ = loading.load_model(untied_says, fast=False)
    assert loaded.llm.lm_head.weight is loaded.llm.embed_tokens.weight
    assert torch.equal(logits(loaded, tokenizer), logits(model, tokenizer))

    tied_says = copy_with_config(TINY, tmp_path / "tied-says", lambda c: c.update(tie_word_embeddings=True))
    tensors = load_file(str(tied_says / "model.safetensors"))
    head = tensors["model.embed_tokens.weight"].flip(0).contiguous()         # another head than the embedding
    save_file({**tensors, "lm_head.weight": head}, str(tied_says / "model.safetensors"))
    loaded, _, _ = loading.load_model(tied_says, fast=False)
    assert loaded.llm.lm_head.weight is not loaded.llm.embed_tokens.weight
    assert torch.equal(loaded.llm.lm_head.weight, head)


# --- every config field: read, fixed, or ignored -------------------------------------------------------------

def test_every_published_config_field_is_read_fixed_or_ignored():
    """Every field of Apple's published config.json, of transformers' fast_vlm config (with its text_config
    and vision_config) and of what this project writes is listed once: read (it decides the model), fixed
    (another value is refused) or ignored with the reason. A new field in a release shows up here."""
    read, fixed, ignored = set(loading.READ_FIELDS), set(loading.FIXED_FIELDS), set(loading.IGNORED_FIELDS)
    assert not (read & fixed or read & ignored or fixed & ignored)
    assert all(why.strip() for why in loading.IGNORED_FIELDS.values())
    hf = TRANSFORMERS_CONFIG
    ours = loading.fast_vlm_config(FV.repmixer.FastViTHDConfig(image_size=256), FV.qwen2.QWEN2_0_5B, 151646)
    published = (set(OFFICIAL_CONFIG) | {"auto_map"} | set(hf) | set(hf["text_config"]) | set(hf["vision_config"])
                 | set(ours) | set(ours["text_config"]) | set(ours["vision_config"])
                 | set(loading.llava_config(FV.repmixer.FastViTHDConfig(image_size=256), FV.qwen2.QWEN2_0_5B)))
    assert published <= read | fixed | ignored, sorted(published - read - fixed - ignored)


WRONG = {"image_aspect_ratio": "anyres", "mm_patch_merge_type": "spatial_unpad", "mm_use_im_start_end": True,
         "mm_use_im_patch_token": True, "vision_feature_select_strategy": "default", "vision_feature_layer": -2}


@pytest.mark.parametrize("field", sorted(WRONG))
def test_a_fixed_field_with_another_value_is_refused(field, tmp_path):
    """A config whose fixed field holds another value describes another model (an anyres preprocessing,
    <im_start> tokens around the image, another feature layer, ...): refused with the field named, in
    either layout; the published value loads."""
    assert set(WRONG) == set(loading.FIXED_FIELDS)                   # a new fixed field needs its case here
    for i, base in enumerate((OFFICIAL_CONFIG, TRANSFORMERS_CONFIG)):
        loading.model_config(config_only(tmp_path / f"ok{i}", {**base, field: loading.FIXED_FIELDS[field]}))
        with pytest.raises(CheckpointError, match=f"config.json: {field} .* is not supported"):
            loading.model_config(config_only(tmp_path / f"bad{i}", {**base, field: WRONG[field]}))


@pytest.mark.parametrize("field,value", [
    ("hidden_act", "gelu"), ("use_sliding_window", True), ("layer_types", ["sliding_attention"] * 24),
    ("rope_scaling", {"type": "linear", "factor": 2.0}), ("head_dim", 32),
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0})])
def test_a_language_model_field_of_another_model_is_refused(field, value, tmp_path):
    """The language model's fields that hold one value in every Qwen2 FastVLM (SiLU, plain RoPE, full
    attention, head_dim = width / heads), another in Apple's flat config or in transformers' text_config:
    refused in one line that names the field."""
    text = {**TRANSFORMERS_CONFIG["text_config"], field: value}
    for i, config in enumerate(({**OFFICIAL_CONFIG, field: value}, {**TRANSFORMERS_CONFIG, "text_config": text})):
        with pytest.raises(CheckpointError, match=f"^config.json: .*{field}.* is not supported"):
            loading.model_config(config_only(tmp_path / f"m{i}", config))


@pytest.mark.parametrize("where,change,outcome", [
    # Apple's layout
    ("llava", {"mm_vision_tower": "mobileclip_l_512"}, 512),
    ("llava", {"mm_vision_tower": "mobileclip_l_1000"}, "is not a multiple of the encoder's stride 64"),
    ("llava", {"mm_vision_tower": "clip_vit_large_336"}, "vision tower 'clip_vit_large_336' is not supported"),
    ("llava", {"mm_projector_type": "linear"}, "projector 'linear' is not supported"),
    ("llava", {"mm_hidden_size": 1536}, "mm_hidden_size 1536 does not match the vision tower's 3072 channels"),
    ("llava", {"fastvithd": {"widths": [8, 16, 32, 64, 128], "depths": [1, 1, 1, 1, 1], "head_dim": 16,
                             "image_size": 256}, "mm_hidden_size": 256}, 256),
    ("llava", {"fastvithd": {"widths": [8, 16, 32, 64, 128], "depths": [1, 1, 1, 1, 1], "head_dim": 16}},
     "mm_hidden_size 3072 does not match the vision tower's 256 channels"),
    ("llava", {"model_type": "llava_llama"}, "model_type 'llava_llama' is not FastVLM"),
    # transformers' layout
    ("fast_vlm", {"image_seq_length": 64}, 512),
    ("fast_vlm", {"image_seq_length": 65}, "image_seq_length 65 is not a square number"),
    ("fast_vlm", {"vision_config": {**TRANSFORMERS_CONFIG["vision_config"], "hidden_size": 1536}},
     "vision_config hidden_size 1536 does not match the vision tower's 3072 channels"),
    ("fast_vlm", {"vision_config": {**TRANSFORMERS_CONFIG["vision_config"], "architecture": "fastvit_sa12"}},
     "vision tower 'fastvit_sa12' is not supported"),
    ("fast_vlm", {"projector_hidden_act": "relu"}, "only the GELU projector with biases"),
    ("fast_vlm", {"multimodal_projector_bias": False}, "only the GELU projector with biases"),
    ("fast_vlm", {"fastvithd": {"widths": [8, 16, 32, 64, 128], "depths": [1, 1, 1, 1, 1], "head_dim": 16,
                                "image_size": 256},
                  "vision_config": {**TRANSFORMERS_CONFIG["vision_config"], "hidden_size": 256}},
     "image_seq_length 256 does not match the vision tower's 16 tokens"),
    ("fast_vlm", {"text_config": {**TRANSFORMERS_CONFIG["text_config"], "model_type": "llama"}},
     "text_config model_type 'llama' is not supported"),
    ("fast_vlm", {"text_config": {**TRANSFORMERS_CONFIG["text_config"], "rope_parameters": {"rope_theta": 10.0}}},
     10.0),
])
def test_a_vision_or_layout_field_changes_the_model_or_is_refused(where, change, outcome, tmp_path):
    """The fields that choose the vision tower, the projector and the layout: another size gives another
    tower (an image side, or the rope_theta the language model gets), anything unsupported one line."""
    base = OFFICIAL_CONFIG if where == "llava" else TRANSFORMERS_CONFIG
    folder = config_only(tmp_path / "m", {**base, **change})
    if isinstance(outcome, str):
        with pytest.raises(CheckpointError, match=outcome.replace("(", r"\(").replace("'", "'")):
            loading.model_config(folder)
    elif isinstance(outcome, float):
        assert loading.model_config(folder)[2].rope_theta == outcome
    else:
        assert loading.model_config(folder)[1].image_size == outcome


@pytest.mark.parametrize("field,value", [("rms_norm_eps", 0.5), ("rope_theta", 10.0),
                                         ("num_attention_heads", 8)])
def test_a_language_model_field_changes_the_answer(field, value, tmp_path, tiny):
    """Fields that size no weight still change the computation: the norms' eps, RoPE's base, the heads
    the width is split into (8 heads of 16 with 4 k/v heads holds the same weights as 4 of 32 with 2)."""
    model, tokenizer, _ = tiny
    change = {field: value, **({"num_key_value_heads": 4} if field == "num_attention_heads" else {})}
    folder = copy_with_config(TINY, tmp_path / "m", lambda c: c.update(change))
    changed, _, _ = loading.load_model(folder, fast=False)
    assert getattr(changed.llm.cfg, field) == value
    assert not torch.allclose(logits(changed, tokenizer), logits(model, tokenizer), rtol=1e-3, atol=1e-3)


def test_context_fields_bound_the_conversation(tmp_path, tiny):
    """The context is the smaller of tokenizer_model_max_length and max_position_embeddings: a turn that
    needs one token more than it is refused, one that fits gets its cache."""
    for field, value in (("max_position_embeddings", 512), ("tokenizer_model_max_length", 300)):
        folder = copy_with_config(TINY, tmp_path / field, lambda c: c.update({field: value}))
        model, tokenizer, config = loading.load_model(folder, fast=False)
        chat = CH.Chat(model, tokenizer, CH.load_image(IMAGE), config)
        assert chat.context == value
        needed = len(FV.turn_ids(tokenizer, "What is it?", first=True)) - 1 + model.vision_tower.cfg.num_tokens()
        with pytest.raises(CH.InputError, match=f"context is {value}"):
            chat.ask("What is it?", max_new_tokens=value - needed + 1)
        chat.reserve("What is it?", max_new_tokens=value - needed)
        assert model.llm.max_len == value


def test_image_token_index_must_be_the_tokenizers(tmp_path):
    """transformers' image_token_index names the tokenizer's <image> id; a config and tokenizer that
    disagree are not one model (the answers' vocabulary limit depends on that token)."""
    import convert

    hf, _ = convert.convert(TINY, tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    assert config["image_token_index"] == loading.load_tokenizer(hf).token_id("<image>") == 377
    loading.load_model(hf, fast=False)
    config["image_token_index"] = 12
    (hf / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="image_token_index is 12 but the tokenizer's <image> token is 377"):
        loading.load_model(hf)


# --- questions measured before they are tokenized -------------------------------------------------------

def test_a_20_mb_question_peaks_within_100_mib_of_a_normal_one():
    """One 20 MB question was tokenized before its length was checked, peaking at 3.5 GB. Its UTF-8 length
    now refuses it first: the process's peak memory (VmHWM, in a process of its own) stays within 100 MiB
    of the peak after a normal question, and the refusal is one line."""
    script = textwrap.dedent("""
        import json, sys
        from support import chat as CH, loading

        def peak():
            return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))

        model, tokenizer, config = loading.load_model(sys.argv[1], fast=False)
        chat = CH.Chat(model, tokenizer, CH.load_image(sys.argv[2]), config)
        chat.ask("What is in the picture?", max_new_tokens=8)
        normal = peak()
        question = "What is in the picture? " * (20 * 2**20 // 24)
        try:
            chat.ask(question, max_new_tokens=8)
            error = None
        except CH.InputError as e:
            error = str(e)
        print(json.dumps({"normal": normal, "long": peak(), "error": error}))
    """)
    proc = subprocess.run([sys.executable, "-c", script, str(TINY), str(IMAGE)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["error"] is not None and "\n" not in result["error"]
    assert "the question is 20,971,512 bytes" in result["error"]
    assert result["long"] - result["normal"] < 100 * 2**20, result


def test_the_size_limit_is_exact_and_comes_before_the_image_and_the_tokens(tiny, monkeypatch):
    """A first turn of at most (context x longest token) bytes of NFC text is left to the token count
    (which may answer it); one byte more is refused from its size alone, before the image is encoded or
    a token made. Text that NFC shortens is measured as the tokenizer sees it."""
    model, tokenizer, config = tiny
    longest = CH.longest_token_bytes(tokenizer)
    token = max((t for t in tokenizer.tok.get_vocab() if t.isascii() and t.isprintable()), key=len)
    assert len(token) == longest                                  # the longest token is plain ASCII here
    chat = CH.Chat(model, tokenizer, CH.load_image(IMAGE), config)
    room = chat.context * longest - len(FV.SYSTEM_PROMPT)
    for question in ("x" * (room + 1), "\u00e9" * (room // 2 + 1)):
        monkeypatch.setattr(tokenizer, "encode_text", None)                   # no token may be made
        size = len(question.encode()) + len(FV.SYSTEM_PROMPT)
        assert size > chat.context * longest
        with pytest.raises(CH.InputError, match=f"the question with the system prompt is {size:,} bytes: more "
                           f"than the {chat.context:,} tokens left"):
            chat.ask(question)
        monkeypatch.undo()
        assert chat.image_embeds is None                                      # nor the image encoded
    decomposed = "e\u0301" * (room // 2)                                       # 3 bytes each, 2 after NFC
    assert len(decomposed.encode()) > room
    for question in ("x" * room, decomposed):
        with pytest.raises(CH.InputError, match="the conversation needs"):    # counted in tokens
            chat.ask(question)


def test_nfc_never_shortens_utf8_more_than_the_limit_assumes():
    """The size check trusts that NFC shortens UTF-8 text at most NFC_MAX_SHRINK times: every character
    with a canonical decomposition, and every Hangul syllable, checked from its fully decomposed form."""
    ratio = 0.0
    for code in range(0x110000):
        c = chr(code)
        if 0xD800 <= code < 0xE000 or not (0xAC00 <= code < 0xD7A4 or unicodedata.decomposition(c)[:1] not in ("", "<")):
            continue
        composed = len(unicodedata.normalize("NFC", c).encode())
        ratio = max(ratio, len(unicodedata.normalize("NFD", c).encode()) / composed, len(c.encode()) / composed)
    assert ratio == CH.NFC_MAX_SHRINK


# --- allocation ---------------------------------------------------------------------------------------

def test_allocation_makes_each_tensor_once_a_tied_heads_too():
    """Loading a tied model onto a GPU peaked at twice its size: to_empty() allocated the embedding that
    the head shares a second time (a GPU's memory is taken at once; a CPU's pages only when written,
    which hid it). Counted on the CPU here: the bytes allocate() asks for are the model's own, the RoPE
    tables aside."""
    import qwen2
    import repmixer
    from torch.utils._python_dispatch import TorchDispatchMode

    class Allocations(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.storages = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                    self.storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return out

    vision = repmixer.FastViTHDConfig(depths=(1, 1, 1, 1, 1), widths=(8, 16, 32, 64, 128), head_dim=16, image_size=256)
    llm = qwen2.Qwen2Config(**{k: v for k, v in SMALL_LLM.items() if k != "max_window_layers"})
    with torch.device("meta"):
        model = FV.FastVLM(vision, llm)
    with Allocations() as seen:
        model = loading.allocate(model, torch.bfloat16)
    assert model.llm.lm_head.weight is model.llm.embed_tokens.weight
    stored = sum(t.nbytes for t in {t.data_ptr(): t for t in model.state_dict().values()}.values())
    rope = model.llm.rope_cos.nbytes + model.llm.rope_sin.nbytes
    assert model.llm.embed_tokens.weight.nbytes > stored / 2             # the head's copy would be seen
    assert sum(seen.storages.values()) <= stored + 4 * rope, (sum(seen.storages.values()), stored)
