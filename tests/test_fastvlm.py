"""End to end: official-layout checkpoints load exactly, and the answer equals an independent pipeline's."""

import contextlib
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file, save_file

import fastvlm as FV
import qwen2 as Q
import repmixer as R
from support.checkpoint import CheckpointError
from synthetic import manifest, write_fastvlm_checkpoint
from tolerance import assert_close
from support import chat as CH, checkpoint, loading, speedups  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"

pytestmark = pytest.mark.inference
ROOT = Path(__file__).parent.parent
SMALL_VISION = R.FastViTHDConfig(depths=(1, 1, 1, 1, 1), widths=(8, 16, 32, 64, 128), head_dim=16, image_size=256)


@pytest.fixture(scope="session")
def official_folder(tmp_path_factory):
    """Full FastViTHD + small Qwen2, every key named as in the official manifest, stored in bf16."""
    return write_fastvlm_checkpoint(tmp_path_factory.mktemp("llava-fastvithd_official"))


@pytest.fixture(scope="session")
def official_model(official_folder):
    return loading.load_model(official_folder)


@pytest.fixture(scope="session")
def untied_folder(tmp_path_factory):
    """The same with an untied head (`lm_head.weight` stored), as the 7B checkpoint has."""
    return write_fastvlm_checkpoint(tmp_path_factory.mktemp("llava-fastvithd_untied"), tied=False)


@pytest.fixture(scope="session")
def small_folder(tmp_path_factory):
    """The same layout with a small vision config (config.json carries it): fast end-to-end runs."""
    return write_fastvlm_checkpoint(tmp_path_factory.mktemp("small"), vision_cfg=SMALL_VISION)


def test_checkpoint_uses_every_official_key_name(official_folder):
    stored = set(load_file(str(official_folder / "model.safetensors")))
    official = {k for k, _, _ in manifest("0.5b")} - {"lm_head.weight"}       # tied: not in the file
    llm_layers = {k for k in official if k.startswith("model.layers.") and int(k.split(".")[2]) >= 2}
    assert stored == official - llm_layers                                    # the small LLM has 2 layers


def test_load_model_fills_everything(official_model):
    model, tokenizer, config = official_model
    # Folding each ConvFFN's BatchNorm (weight + bias) into its conv leaves one bias: C fewer parameters
    # per block; 2x96 + 12x192 + 24x384 + 4x768 + 2x1536 = 17,856 of the release's 122,714,208.
    folded = sum(d * w for d, w in zip(R.FASTVITHD.depths, R.FASTVITHD.widths))
    assert folded == 17_856
    assert sum(p.numel() for p in model.vision_tower.parameters()) == 122_714_208 - folded
    assert model.vision_tower.is_fused and model.image_size == 1024
    assert model.llm.lm_head.weight is model.llm.embed_tokens.weight
    assert len(tokenizer) == 151646 and config["mm_vision_tower"] == "mobileclip_l_1024"


def test_loading_never_accumulates_file_tensors(small_folder, monkeypatch):
    """load_model copies each tensor into its parameter and drops it: when a tensor is read from
    the file, every tensor read before the previous one is gone (the loop still holds the previous one
    until it moves on), so loading never holds a second copy of the model (0.5B: docs/performance.md)."""
    import gc
    import weakref

    real = checkpoint.iter_safetensors
    kept = []

    def watched(folder, dtype=None):
        read = []
        for name, tensor in real(folder, dtype):
            gc.collect()
            kept.append(sum(ref() is not None for ref in read[:-1]))
            read.append(weakref.ref(tensor))
            yield name, tensor
            del tensor

    monkeypatch.setattr(loading, "iter_safetensors", watched)
    model, _, _ = loading.load_model(small_folder)
    stored = load_file(str(small_folder / "model.safetensors"))
    assert len(kept) == len(stored) and max(kept) == 0, "tensors read from the file were kept alive"
    assert torch.equal(model.llm.layers[1].mlp.up_proj.weight, stored["model.layers.1.mlp.up_proj.weight"].float())


def test_untied_checkpoint_keeps_its_own_head(untied_folder):
    stored = set(load_file(str(untied_folder / "model.safetensors")))
    assert "lm_head.weight" in stored
    model, _, _ = loading.load_model(untied_folder)
    head, embed = model.llm.lm_head.weight, model.llm.embed_tokens.weight
    assert head is not embed and head.data_ptr() != embed.data_ptr() and not torch.equal(head, embed)


# Tolerances of the end-to-end reference, elementwise (tests/tolerance.py). Both pipelines compute in
# float32 on the same bf16-rounded weights; they differ by summation order only (oneDNN vs torch 2.14's
# kernels, channels-last vs not, the ConvFFN BatchNorm folded vs applied). Measured 2026-11-26 on a
# 2-core AMD EPYC (Zen 4, AVX-512): features within 2.0e-5 x std of timm's, image embeddings 7e-6,
# logits 3e-6. A bound of 1e-4 relative + 1e-4 x std leaves 5-30x room for other CPUs, while scaling
# the features by 1.01 puts the logits 270x over it.
E2E_RTOL, E2E_ATOL = 1e-4, 1e-4


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_matches_independent_pipeline(tied, official_model, untied_folder):
    """Every stage equals timm + transformers + the official image processor (tests/make_e2e_fixtures.py):
    pixels exactly, prompt ids exactly, vision features, projected image embeddings and first-step logits
    elementwise, and 16 greedy tokens, which are diverse (a repeated token would check one argmax)."""
    model, tokenizer, config = official_model if tied else loading.load_model(untied_folder)
    ref = load_file(str(FIXTURES / "e2e_reference.safetensors"))
    suffix = "" if tied else "_untied"
    image = CH.load_image(FIXTURES / "e2e_image.png")
    pixels = FV.preprocess(image, 1024)
    assert torch.equal(pixels[:, ::64], ref["pixels_rows"])
    assert pixels.double().sum().item() == pytest.approx(ref["pixels_sum"].item(), rel=1e-12, abs=0)
    ids = FV.turn_ids(tokenizer, "What is in the picture?", first=True)
    assert ids == ref["prompt_ids"].tolist()

    seen = {}
    hook = model.vision_tower.register_forward_hook(lambda m, i, out: seen.update(features=out))
    try:
        image_embeds = model.encode_image(pixels[None])                     # (1, 256, d)
    finally:
        hook.remove()
    assert_close(seen["features"], ref["features"], E2E_RTOL, E2E_ATOL, "vision features", min_std=0.5)
    alive = (ref["features"].flatten(2).std(-1) > 1e-3).float().mean()
    assert alive > 0.95, f"only {alive:.0%} of the reference's channels vary over the image"
    assert_close(image_embeds, ref["image_embeds"], E2E_RTOL, E2E_ATOL, "image embeddings", min_std=0.1)
    # the image tokens must not dwarf the text (the LLM's RMSNorm would then hide their scale)
    text = model.llm.embed_tokens(torch.tensor([i for i in ids if i >= 0])).norm(dim=-1).mean()
    assert 0.1 < image_embeds.norm(dim=-1).mean() / text < 10

    logits = model.llm(embeds=model.embed(ids, image_embeds))[0, -1, :len(tokenizer)]
    assert_close(logits, ref["first_logits" + suffix], E2E_RTOL, E2E_ATOL, "first-step logits", min_std=0.5)

    greedy = ref["greedy_ids" + suffix].tolist()
    assert len(set(greedy)) >= 4, "a greedy reference of one repeated token would check a single argmax"
    chat = CH.Chat(model, tokenizer, image, config)
    chat.ask("What is in the picture?", max_new_tokens=len(greedy))
    assert chat.history[len(ids):] == greedy


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


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none): the 256 pixel values as the GPU gets them"))]


@pytest.mark.parametrize("device", DEVICES)
def test_pixels_on_the_device_are_numpys_k_over_255(device):
    """The bytes travel to the device and become floats there: every one of the 256 values must still be
    numpy's float32 k / 255 (an elementwise map, so these are all the cases). The CUDA case runs where
    CUDA is."""
    rgb = torch.arange(256, dtype=torch.uint8).repeat_interleave(3).reshape(16, 16, 3)
    pixels = speedups.to_pixels(rgb, device).cpu()
    expected = np.arange(256, dtype=np.float32).reshape(16, 16) / np.float32(255.0)
    assert pixels.shape == (1, 3, 16, 16) and pixels.is_contiguous()
    for channel in range(3):
        assert np.array_equal(pixels[0, channel].numpy(), expected)
    assert speedups.to_pixels(rgb, device, torch.bfloat16).dtype == torch.bfloat16
    assert torch.equal(FV.to_pixels(rgb), speedups.to_pixels(rgb))          # the model file's, on the CPU
    assert np.array_equal(speedups.PIXEL_VALUES.numpy(), expected.flatten())     # the table a GPU looks them up in


# Apple's `qwen_2` template (llava/conversation.py, sep_style CHATML), written out independently of fastvlm.py
FIRST_TURN = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\n{}<|im_end|>\n"
              "<|im_start|>assistant\n")
NEXT_TURN = "<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


def template_ids(tokenizer, text):
    """The ids of template text with special tokens as control tokens and <image> as the placeholder."""
    pieces = [tokenizer.encode(chunk) for chunk in text.split("<image>")]
    return pieces[0] + sum(([FV.IMAGE_TOKEN_INDEX] + piece for piece in pieces[1:]), [])


def test_prompt_ids_equal_transformers_tokenizer(official_model, official_folder):
    _, tokenizer, _ = official_model
    ref = transformers.AutoTokenizer.from_pretrained(official_folder)
    for question in ["Describe the image.", "What's 12+30? 答えて 🙂", "  spaces  \n\nnewlines"]:
        text = FIRST_TURN.format(question)
        pieces = [ref(chunk).input_ids for chunk in text.split("<image>")]
        assert FV.turn_ids(tokenizer, question, first=True) == pieces[0] + [FV.IMAGE_TOKEN_INDEX] + pieces[1]
    assert FV.turn_ids(tokenizer, "Describe the image.", first=True) == [
        151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198, -200, 198,
        74785, 279, 2168, 13, 151645, 198, 151644, 77091, 198]                # from Apple's code (reference notes)


def test_multi_turn_reusing_the_cache_equals_recomputing(small_folder):
    """A chat prefills only each follow-up's tokens; a stateless implementation feeds the whole
    conversation again from position 0 (a second copy of the model here): the answers are the same."""
    model, tokenizer, config = loading.load_model(small_folder)
    again, _, _ = loading.load_model(small_folder)
    image = CH.load_image(FIXTURES / "e2e_image.png")
    chat = CH.Chat(model, tokenizer, image, config)
    pixels = speedups.to_pixels(FV.square_rgb(image, model.image_size))
    for question in ("What is it?", "And the colour?", "Sure?"):
        answer = chat.ask(question, max_new_tokens=8)
        history = chat.history[:len(chat.history) - chat.timing.new_tokens]          # without this answer
        again.llm.setup_cache(1024)
        out, _ = Q.generate(again.llm, embeds=again.embed(history, again.encode_image(pixels)), max_new_tokens=8,
                            stop_ids=chat.stop_ids, vocab_limit=chat.vocab_limit)
        assert tokenizer.decode(out).strip() == answer
        if question != "What is it?":
            assert chat.timing.encoder == 0 and chat.timing.prompt_tokens < 20    # follow-up: only its tokens


def test_warm_up_pays_the_first_call_and_leaves_the_chat_as_it_was(small_folder):
    """--timing on a GPU runs a warm-up turn first: it must record the decode graph and size the cache
    for the real turn (so that turn records nothing), and change nothing the real turn sees."""
    from test_speedups import graphed

    image = CH.load_image(FIXTURES / "e2e_image.png")
    model, tokenizer, config = loading.load_model(small_folder)
    expected = CH.Chat(model, tokenizer, image, config).ask("What is it?", max_new_tokens=40)

    model, tokenizer, config = loading.load_model(small_folder, fast=False)
    recorded = []
    model.llm = graphed(model.llm, recorded)                      # the CUDA swap, on CPU with a stand-in graph
    chat = CH.Chat(model, tokenizer, image, config)
    assert speedups.warm_up(chat, "What is it?", max_new_tokens=1000) > 0
    assert (chat.history, chat.pos, chat.image_embeds) == ([], 0, None)
    assert len(recorded) == 2                                     # the warm-up recorded prefill and decode
    needed = len(FV.turn_ids(tokenizer, "What is it?", first=True)) - 1 + model.vision_tower.cfg.num_tokens()
    assert model.llm.max_len >= needed + 1000                     # for the real turn, not for the warm-up's 2 tokens
    assert model.llm.max_len % 64 == 0                            # attention kernels want aligned rows
    answer = chat.ask("What is it?", max_new_tokens=40)
    assert len(recorded) == 2                                     # and the timed turn recorded nothing
    assert answer == expected and chat.timing.encoder > 0 and chat.timing.new_tokens > 1


def test_typed_image_marker_is_only_text(small_folder):
    """User text is only text: an `<image>` typed in a question is tokenized as characters, in the first
    turn and in a follow-up; the one placeholder is the template's."""
    model, tokenizer, config = loading.load_model(small_folder)
    for question in ("What is in the picture?", "  spaces and 12+30 ", "答えて 🙂"):
        assert FV.turn_ids(tokenizer, question, first=True) == template_ids(tokenizer, FIRST_TURN.format(question))
        assert tokenizer.encode(FV.END) + FV.turn_ids(tokenizer, question, first=False) == \
            template_ids(tokenizer, NEXT_TURN.format(question))
    chat = CH.Chat(model, tokenizer, CH.load_image(FIXTURES / "e2e_image.png"), config)
    chat.ask("Is there an <image> tag here?", max_new_tokens=2)
    chat.ask("And <image> again?", max_new_tokens=2)
    assert chat.history.count(FV.IMAGE_TOKEN_INDEX) == 1
    assert chat.pos == len(chat.history) - 1 + model.vision_tower.cfg.num_tokens()   # no second image in the cache
    assert "<image> again?" in tokenizer.decode([i for i in chat.history if i >= 0], skip_special_tokens=False)


def test_follow_up_turns_follow_the_qwen_2_template(small_folder):
    """The cache after two turns holds exactly the conversation in the `qwen_2` template of Apple's
    llava/conversation.py (sep_style CHATML), written out here independently of fastvlm.py's strings."""
    model, tokenizer, config = loading.load_model(small_folder)
    chat = CH.Chat(model, tokenizer, CH.load_image(FIXTURES / "e2e_image.png"), config)
    answers = [chat.ask("What is it?", max_new_tokens=3), chat.ask("And the colour?", max_new_tokens=3)]
    at = chat.history.index(FV.IMAGE_TOKEN_INDEX)
    text = (tokenizer.decode(chat.history[:at], skip_special_tokens=False) + "<image>"
            + tokenizer.decode(chat.history[at + 1:], skip_special_tokens=False))
    template = re.compile(re.escape("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                                    "<|im_start|>user\n<image>\nWhat is it?<|im_end|>\n<|im_start|>assistant\n")
                          + "(.*)" + re.escape("<|im_end|>\n<|im_start|>user\nAnd the colour?<|im_end|>\n"
                                               "<|im_start|>assistant\n") + "(.*)", re.S)
    match = template.fullmatch(text)
    assert match, text
    assert [g.strip() for g in match.groups()] == answers


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
    a, _, _ = loading.load_model(tmp_path)
    b, _, _ = loading.load_model(small_folder)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_unsupported_config_is_named(small_folder, tmp_path):
    for f in small_folder.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    del config["fastvithd"]
    config["mm_vision_tower"] = "clip_vit_large_336"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="clip_vit_large_336"):
        loading.load_model(tmp_path)


def test_official_checkpoint_answers_through_infer_subprocess(official_folder, official_model):
    run = subprocess.run([sys.executable, str(ROOT / "infer.py"), str(FIXTURES / "e2e_image.png"),
                          "What is in the picture?", "--model", str(official_folder), "--max-new-tokens", "4",
                          "--timing", "--dtype", "float32"],       # the reference is float32's (auto may be bf16)
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    greedy = load_file(str(FIXTURES / "e2e_reference.safetensors"))["greedy_ids"][:4].tolist()
    assert run.stdout.strip() == official_model[1].decode(greedy).strip()     # the reference's greedy answer
    assert "time to first token" in run.stderr and "vision encoder" in run.stderr and "prefill" in run.stderr
    assert "start-up" not in run.stderr and "steady state" not in run.stderr      # CPU: no warm-up turn


def test_timing_reports_a_gpu_start_up_apart():
    import infer

    chat = SimpleNamespace(timing=CH.Timing(preprocess=0.010, encoder=0.009, projector=0.0005, prefill=0.016,
                                            prompt_tokens=282, decode=0.125, new_tokens=51))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        CH.print_timing(chat, torch.device("cpu"), startup=2.4)
    lines = err.getvalue().splitlines()
    assert lines[0].startswith("start-up, first call only: 2400 ms")
    assert lines[1] == "time to first token: 36 ms (steady state, after the warm-up)"
    assert lines[3] == "decode: 51 tokens, 400.0 tokens/s"


# --- official vision-tower names (Apple's `network.N`, `reparam_conv`, ... onto ours) ---------------------

@pytest.mark.parametrize("size", ["0.5b", "1.5b", "7b"])
def test_every_manifest_key_maps_onto_the_model(size):
    model = R.FastViTHD(fused=True)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    seen = set()
    for key, shape, _ in manifest(size):
        if not key.startswith(loading.VISION_PREFIX):
            continue
        mapped = loading.official_key(key[len(loading.VISION_PREFIX):])
        if mapped is None:
            assert key.endswith("head.proj")
            continue
        assert mapped in ours, f"{key} -> {mapped} is not a model tensor"
        assert ours[mapped] == shape, key
        seen.add(mapped)
    assert seen == set(ours), f"not filled: {sorted(set(ours) - seen)[:3]}"


def test_official_key_mapping_examples():
    assert loading.official_key("patch_embed.0.reparam_conv.weight") == "stem.0.fused.weight"
    assert loading.official_key("network.0.1.token_mixer.reparam_conv.bias") == "stages.0.blocks.1.token_mixer.fused.bias"
    assert loading.official_key("network.1.proj.0.lkb_reparam.weight") == "stages.1.downsample.spatial.fused.weight"
    assert loading.official_key("network.5.proj.1.reparam_conv.bias") == "stages.3.downsample.pointwise.fused.bias"
    assert loading.official_key("network.6.reparam_conv.weight") == "stages.3.cpe.fused.weight"
    assert loading.official_key("network.10.1.convffn.conv.bn.running_var") == "stages.4.blocks.1.convffn.local.bn.running_var"
    assert loading.official_key("network.7.3.token_mixer.qkv.weight") == "stages.3.blocks.3.token_mixer.qkv.weight"
    assert loading.official_key("conv_exp.se.reduce.weight") == "expand.se.reduce.weight"
    assert loading.official_key("head.proj") is None


def test_loader_names_the_bad_key(small_folder, tmp_path):
    """A checkpoint whose vision tower disagrees with its config is refused at its first wrong tensor,
    named as the file names it and as the model does (a wrong shape, a missing and an unexpected one)."""
    stored = checkpoint.read_safetensors(small_folder)
    fc1 = next(k for k in stored if k.startswith(loading.VISION_PREFIX) and k.endswith("convffn.fc1.weight"))
    cases = [(lambda t: t.__setitem__(fc1, torch.zeros(5, 5, 1, 1)),
              re.escape(f"'{fc1}'") + r" \(ours: vision_tower\.stages\.\d\.blocks\.\d\.convffn\.fc1\.weight\).*\(5, 5, 1, 1\)"),
             (lambda t: t.pop(loading.VISION_PREFIX + "conv_exp.se.expand.bias"),
              r"missing tensor '.*model\.conv_exp\.se\.expand\.bias' \(ours: vision_tower\.expand\.se\.expand\.bias\)"),
             (lambda t: t.__setitem__(loading.VISION_PREFIX + "network.99.0.layer_scale", torch.zeros(1)),
              r"unexpected tensor .*network\.99\.0\.layer_scale")]
    for k, (change, message) in enumerate(cases):
        folder = tmp_path / f"bad{k}"
        shutil.copytree(small_folder, folder)
        tensors = dict(stored)
        change(tensors)
        checkpoint.write_safetensors(tensors, folder / "model.safetensors")
        with pytest.raises(CheckpointError, match=message):
            loading.load_model(folder)


def test_official_key_mapping_round_trips_both_ways():
    for cfg in (R.FASTVITHD, SMALL_VISION):
        names = R.FastViTHD(cfg, fused=True).state_dict()
        assert all(loading.official_key(loading.to_official_key(k, cfg), cfg) == k for k in names)
    official = [k[len(loading.VISION_PREFIX):] for k, _, _ in manifest() if k.startswith(loading.VISION_PREFIX)]
    assert all(loading.to_official_key(loading.official_key(k)) == k for k in official if not k.startswith("head."))
