"""End to end: official-layout checkpoints load exactly, and the answer equals an independent pipeline's."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file, save_file

import fastvlm as FV
import repmixer as R
from checkpoint import CheckpointError
from synthetic import FIXTURES, manifest, write_fastvlm_checkpoint

torch.set_grad_enabled(False)
ROOT = Path(__file__).parent.parent
SMALL_VISION = R.FastViTHDConfig(depths=(1, 1, 1, 1, 1), widths=(8, 16, 32, 64, 128), head_dim=16, image_size=256)


@pytest.fixture(scope="session")
def official_folder(tmp_path_factory):
    """Full FastViTHD + small Qwen2, every key named as in the official manifest, stored in bf16."""
    return write_fastvlm_checkpoint(tmp_path_factory.mktemp("llava-fastvithd_official"))


@pytest.fixture(scope="session")
def official_model(official_folder):
    return FV.FastVLM.from_pretrained(official_folder)


@pytest.fixture(scope="session")
def small_folder(tmp_path_factory):
    """The same layout with a small vision config (config.json carries it): fast end-to-end runs."""
    return write_fastvlm_checkpoint(tmp_path_factory.mktemp("small"), vision_cfg=SMALL_VISION)


def test_checkpoint_uses_every_official_key_name(official_folder):
    stored = set(load_file(str(official_folder / "model.safetensors")))
    official = {k for k, _, _ in manifest("0.5b")} - {"lm_head.weight"}       # tied: not in the file
    llm_layers = {k for k in official if k.startswith("model.layers.") and int(k.split(".")[2]) >= 2}
    assert stored == official - llm_layers                                    # the small LLM has 2 layers


def test_from_pretrained_fills_everything(official_model):
    model, tokenizer, config = official_model
    assert sum(p.numel() for p in model.vision_tower.parameters()) < 122_714_208   # ConvFFN BN folded
    assert model.vision_tower.is_fused and model.image_size == 1024
    assert model.llm.lm_head.weight is model.llm.embed_tokens.weight
    assert len(tokenizer) == 151646 and config["mm_vision_tower"] == "mobileclip_l_1024"


def test_matches_independent_pipeline(official_model):
    """Pixels, prompt ids, first-step logits and greedy tokens equal timm + transformers' (fixture)."""
    model, tokenizer, config = official_model
    ref = load_file(str(FIXTURES / "e2e_reference.safetensors"))
    image = FV.load_image(FIXTURES / "e2e_image.png")
    pixels = FV.preprocess(image, 1024)
    assert torch.equal(pixels[:, ::64], ref["pixels_rows"][:, :, :])
    ids = FV.tokenize_with_image(tokenizer, FV.first_turn("What is in the picture?"))
    assert ids == ref["prompt_ids"].tolist()
    embeds = model.embed(ids, model.encode_image(pixels[None]))
    logits = model.llm(embeds=embeds)[0, -1, :len(tokenizer)]
    expected = ref["first_logits"]
    assert expected.std() > 0.5, "degenerate logits prove nothing"
    assert (logits - expected).abs().max() <= 1e-4 * expected.abs().max()
    chat = FV.Chat(model, tokenizer, image, config)
    chat.ask("What is in the picture?", max_new_tokens=len(ref["greedy_ids"]))
    assert chat.history[len(ids):] == ref["greedy_ids"].tolist()


@pytest.mark.parametrize("size", [(640, 480), (300, 900), (570, 380), (1000, 667), (1, 1)])
def test_preprocessing_equals_official_image_processor(size):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil(crop_size={"height": 1024, "width": 1024}, image_mean=[0.0, 0.0, 0.0],
                                      image_std=[1.0, 1.0, 1.0], size={"shortest_edge": 1024})
    rng = np.random.default_rng(size[0])
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    # Apple's expand2square, independently: pad with black, centred
    side = max(size)
    square = Image.new("RGB", (side, side), (0, 0, 0))
    square.paste(img, ((side - size[0]) // 2, (side - size[1]) // 2))
    expected = processor(square, return_tensors="pt")["pixel_values"][0]
    assert torch.equal(FV.preprocess(img, 1024), expected)


def test_prompt_ids_equal_transformers_tokenizer(official_model, official_folder):
    _, tokenizer, _ = official_model
    ref = transformers.AutoTokenizer.from_pretrained(official_folder)
    for question in ["Describe the image.", "What's 12+30? 答えて 🙂", "  spaces  \n\nnewlines"]:
        text = FV.first_turn(question)
        pieces = [ref(chunk).input_ids for chunk in text.split("<image>")]
        assert FV.tokenize_with_image(tokenizer, text) == pieces[0] + [FV.IMAGE_TOKEN_INDEX] + pieces[1]
    assert FV.tokenize_with_image(tokenizer, FV.first_turn("Describe the image.")) == [
        151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198, -200, 198,
        74785, 279, 2168, 13, 151645, 198, 151644, 77091, 198]                # from Apple's code (reference notes)


def test_multi_turn_reusing_the_cache_equals_recomputing(small_folder):
    model, tokenizer, config = FV.FastVLM.from_pretrained(small_folder)
    image = FV.load_image(FIXTURES / "e2e_image.png")
    answers = []
    for reuse in (True, False):
        chat = FV.Chat(model, tokenizer, image, config, reuse_cache=reuse)
        turns = [chat.ask(q, max_new_tokens=8) for q in ("What is it?", "And the colour?", "Sure?")]
        answers.append((turns, list(chat.history)))
        if reuse:
            assert chat.timing.encoder == 0 and chat.timing.prompt_tokens < 20    # follow-up: only its tokens
    assert answers[0] == answers[1]


def test_sharded_checkpoint_loads(small_folder, tmp_path):
    tensors = load_file(str(small_folder / "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(tmp_path / file))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    for f in small_folder.iterdir():
        if f.suffix != ".safetensors":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    a, _, _ = FV.FastVLM.from_pretrained(tmp_path)
    b, _, _ = FV.FastVLM.from_pretrained(small_folder)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_unsupported_config_is_named(small_folder, tmp_path):
    for f in small_folder.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    del config["fastvithd"]
    config["mm_vision_tower"] = "clip_vit_large_336"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="clip_vit_large_336"):
        FV.FastVLM.from_pretrained(tmp_path)


def test_official_checkpoint_answers_through_infer_subprocess(official_folder, official_model):
    run = subprocess.run([sys.executable, str(ROOT / "infer.py"), str(FIXTURES / "e2e_image.png"),
                          "What is in the picture?", "--model", str(official_folder), "--max-new-tokens", "4",
                          "--timing"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    greedy = load_file(str(FIXTURES / "e2e_reference.safetensors"))["greedy_ids"][:4].tolist()
    assert run.stdout.strip() == official_model[1].decode(greedy).strip()     # the reference's greedy answer
    assert "time to first token" in run.stderr and "vision encoder" in run.stderr and "prefill" in run.stderr
