"""Every FastVLM a user holds: Apple's LLaVA layout, transformers' `fast_vlm` layout (checked against
transformers itself), conversions both ways, folders that cannot work, and models named by Hub repo id."""

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import convert
import fastvlm as FV
import infer
import qwen2
import repmixer as R
from checkpoint import CheckpointError
from synthetic import REFERENCE, synthetic_image, write_fastvlm_checkpoint
from tolerance import assert_close

pytestmark = pytest.mark.inference
FIXTURES = Path(__file__).parent / "fixtures"
RTOL = ATOL = 1e-4             # as tests/test_fastvlm.py's end-to-end comparison


@pytest.fixture(scope="module")
def llava_small(small_model_dir):
    return small_model_dir


@pytest.fixture(scope="module")
def hf_small(llava_small, tmp_path_factory):
    return convert.convert(llava_small, tmp_path_factory.mktemp("hf") / "m")[0]


def answers(folder, questions=("What is it?", "And the colour?"), **kw):
    model, tokenizer, config = FV.FastVLM.from_pretrained(folder, **kw)
    chat = FV.Chat(model, tokenizer, FV.load_image(FIXTURES / "e2e_image.png"), config)
    return [chat.ask(q, max_new_tokens=8) for q in questions]


# --- the fast_vlm layout's names ------------------------------------------------------------------------

def test_every_transformers_key_maps_onto_the_model_and_back():
    """All 923 keys of transformers' FastVLM-0.5B (committed manifest) name a tensor of our model with
    the same shape, every tensor of ours is named once, and the mapping inverts exactly."""
    rows = [r.split("\t") for r in (REFERENCE / "transformers_fast_vlm_0.5b_state_dict.tsv").read_text().splitlines()[1:]]
    config = json.loads((REFERENCE / "transformers_fast_vlm_0.5b_config.json").read_text())
    vision_cfg = FV.vision_config(config)
    llm_cfg = qwen2.Qwen2Config.from_dict(config["text_config"])
    assert vision_cfg == R.FASTVITHD and llm_cfg.vocab_size == 152000 and llm_cfg.rope_theta == 1e6
    with torch.device("meta"):
        own = FV.FastVLM(vision_cfg, qwen2.Qwen2Config(**{**llm_cfg.__dict__, "tie_word_embeddings": False})).state_dict()
    seen = set()
    for key, shape, _ in rows:
        ours = FV.FAST_VLM.ours(key, vision_cfg)
        assert ours in own, (key, ours)
        assert tuple(own[ours].shape) == tuple(int(s) for s in shape.split(",") if s), key
        assert FV.FAST_VLM.theirs(ours, vision_cfg) == key
        seen.add(ours)
    assert seen == set(own)
    assert FV.timm_key("stages.3.pos_emb.reparam_conv.weight") == "stages.3.cpe.fused.weight"
    assert FV.timm_key("stages.4.blocks.1.layer_scale_2.gamma") == "stages.4.blocks.1.layer_scale_2"
    assert FV.timm_key("final_conv.se.fc1.weight") == "expand.se.reduce.weight"


@pytest.mark.parametrize("tied", [True, False])
def test_fast_vlm_folder_matches_transformers(tied, tmp_path):
    """Our converter's fast_vlm folder, loaded by transformers' FastVlmForConditionalGeneration and its
    processor (tests/make_fast_vlm_fixtures.py: no key missing or unexpected), and by us: prompt ids
    exactly, first-step logits elementwise, and 12 greedy tokens."""
    ref = load_file(str(FIXTURES / "fast_vlm_reference.safetensors"))
    name = "tied" if tied else "untied"
    llava = write_fastvlm_checkpoint(tmp_path / "llava", tied=tied)
    folder, _ = convert.convert(llava, tmp_path / "hf")
    model, tokenizer, config = FV.FastVLM.from_pretrained(folder)
    assert model.layout == "fast_vlm" and (model.llm.lm_head.weight is model.llm.embed_tokens.weight) == tied
    image = Image.fromarray((synthetic_image(512)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    question = "What is in the picture?"
    ids = FV.turn_ids(tokenizer, question, first=True)
    at = ids.index(FV.IMAGE_TOKEN_INDEX)
    expanded = ids[:at] + [config["image_token_index"]] * 256 + ids[at + 1:]
    assert expanded == ref[f"{name}_input_ids"].tolist()
    image_embeds = model.encode_image(FV.preprocess(image, 1024)[None])
    logits = model.llm(embeds=model.embed(ids, image_embeds))[0, -1]
    assert_close(logits, ref[f"{name}_logits"], RTOL, ATOL, "first-step logits", min_std=0.5)
    greedy = ref[f"{name}_greedy"].tolist()
    assert len(set(greedy)) >= 2
    chat = FV.Chat(model, tokenizer, image, config)
    chat.stop_ids = set()                                  # transformers generated past any stop token
    chat.ask(question, max_new_tokens=len(greedy))
    assert chat.history[len(ids):] == greedy


def test_fast_vlm_tokenizer_never_answers_its_image_token(hf_small):
    _, tokenizer, config = FV.FastVLM.from_pretrained(hf_small)
    assert tokenizer.token_id("<image>") == config["image_token_index"] == len(tokenizer) - 1
    assert FV.Chat(FV.FastVLM.from_pretrained(hf_small)[0], tokenizer, None, config).vocab_limit == len(tokenizer) - 1


# --- conversions ----------------------------------------------------------------------------------------

def test_layouts_give_the_same_answers(llava_small, hf_small, tmp_path):
    """The same model in either layout, stored in bf16 or fp32, single file or sharded, answers the same."""
    expected = answers(llava_small)
    assert answers(hf_small) == expected
    fp32 = shutil.copytree(hf_small, tmp_path / "fp32")
    save_file({k: v.float() if v.is_floating_point() else v for k, v in load_file(str(fp32 / "model.safetensors")).items()},
              str(fp32 / "model.safetensors"))
    assert answers(fp32) == expected


def test_sharded_conversion(llava_small, tmp_path, monkeypatch):
    monkeypatch.setattr(convert, "SHARD_BYTES", 200_000)
    folder, _ = convert.convert(llava_small, tmp_path / "hf")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    assert answers(folder) == answers(llava_small)


def test_round_trips(tmp_path):
    """fast_vlm -> LLaVA -> fast_vlm is bit-identical; LLaVA -> fast_vlm -> LLaVA is identical but for the
    unused MobileCLIP head, which transformers' layout does not hold; rows past the tokenizer stay."""
    llava = write_fastvlm_checkpoint(tmp_path / "llava", tied=False)     # full FastViTHD, with head.proj
    hf, _ = convert.convert(llava, tmp_path / "hf")
    back, _ = convert.convert(hf, tmp_path / "back")
    hf2, _ = convert.convert(back, tmp_path / "hf2")
    a, b = load_file(str(llava / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert set(a) - set(b) == {FV.VISION_PREFIX + "head.proj"} and set(b) <= set(a)
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in b)
    assert a["model.embed_tokens.weight"].shape[0] == 151936 > 151646                # padding rows kept
    c, d = load_file(str(hf / "model.safetensors")), load_file(str(hf2 / "model.safetensors"))
    assert set(c) == set(d) and all(torch.equal(c[k], d[k]) and c[k].dtype == d[k].dtype for k in c)
    assert json.loads((hf / "config.json").read_text()) == json.loads((hf2 / "config.json").read_text())
    for folder in (hf, back):
        tokenizer = FV.load_tokenizer(folder)
        assert tokenizer.encode("Describe the image. 答えて") == FV.load_tokenizer(llava).encode("Describe the image. 答えて")


def test_convert_refuses_to_overwrite(llava_small, hf_small, capsys):
    assert convert.main([str(llava_small), str(hf_small)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_train_output_converts_and_answers_alike(tmp_path):
    """A folder written by train.py (the shipped tiny model: its own tokenizer and vision config)."""
    tiny = Path(__file__).parent.parent / "models" / "fastvlm-tiny"
    hf, _ = convert.convert(tiny, tmp_path / "hf")
    back, _ = convert.convert(hf, tmp_path / "back")
    assert answers(hf) == answers(tiny) == answers(back)


# --- folders that cannot work ---------------------------------------------------------------------------

def test_mlx_exports_are_named(llava_small, tmp_path):
    apple = shutil.copytree(llava_small, tmp_path / "apple")
    (apple / "fastvithd.mlpackage").mkdir()
    with pytest.raises(CheckpointError, match="CoreML package"):
        FV.FastVLM.from_pretrained(apple)
    mlx = shutil.copytree(llava_small, tmp_path / "mlx")
    save_file({"language_model.model.embed_tokens.weight": torch.zeros(2, 2),
               "language_model.model.embed_tokens.scales": torch.zeros(2, 1)}, str(mlx / "model.safetensors"))
    with pytest.raises(CheckpointError, match="mlx-vlm's MLX layout"):
        FV.FastVLM.from_pretrained(mlx)


# --- by name ----------------------------------------------------------------------------------------------

def hub_cache(root, repo, folder):
    """A Hugging Face cache as huggingface_hub lays it out: blobs, a snapshot of symlinks, refs/main."""
    base = root / ("models--" + repo.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (base / "blobs").mkdir(parents=True)
    (base / "snapshots" / commit).mkdir(parents=True)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(commit)
    for i, f in enumerate(sorted(folder.iterdir())):
        shutil.copy(f, base / "blobs" / f"blob{i}")
        os.symlink(Path("..") / ".." / "blobs" / f"blob{i}", base / "snapshots" / commit / f.name)
    return root


def test_model_by_repo_id_from_the_cache(llava_small, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache(tmp_path / "hub", "apple/FastVLM-small", llava_small)))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert answers("apple/FastVLM-small") == answers(llava_small)
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path))                 # HF_HOME/hub is the next place looked in
    assert FV.resolve_model("apple/FastVLM-small") == next((tmp_path / "hub").glob("models--*/snapshots/*"))
    monkeypatch.chdir(tmp_path)
    local = shutil.copytree(llava_small, tmp_path / "apple" / "FastVLM-small")
    assert FV.resolve_model("apple/FastVLM-small") == Path("apple/FastVLM-small")   # a local folder wins
    shutil.rmtree(local)
    code = infer.main([str(FIXTURES / "e2e_image.png"), "What is it?", "--model", "apple/FastVLM-small",
                       "--max-new-tokens", "8"])
    assert code == 0 and capsys.readouterr().out.strip() == answers(llava_small)[0]


def test_model_not_cached_gets_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE is set.*hf download apple/FastVLM-0.5B"):
        FV.resolve_model("apple/FastVLM-0.5B")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)     # not installed
    with pytest.raises(CheckpointError, match="pip install huggingface_hub"):
        FV.resolve_model("apple/FastVLM-0.5B")
    with pytest.raises(CheckpointError, match="model folder not found"):
        FV.resolve_model("no/such/folder")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none): checks that loading "
                    "places each tensor on the GPU as it is read, with no second copy")
def test_cuda_load_places_tensors_directly(llava_small):
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    model, _, _ = FV.FastVLM.from_pretrained(llava_small, device="cuda", dtype=torch.bfloat16)
    assert all(t.is_cuda for t in model.state_dict().values())
    stored = sum(t.nbytes for t in {t.data_ptr(): t for t in model.state_dict().values()}.values())
    assert torch.cuda.max_memory_allocated() - before <= 1.25 * stored + 2**22
