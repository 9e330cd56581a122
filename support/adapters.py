"""LoRA adapters (fastvlm.LoRALinear) put into a FastVLM, merged into it, and kept in files in PEFT's layout.

    add_lora(model, r, alpha, dropout, names)     each linear layer of the decoder or the projector whose name
                                                  ends with one of `names` -> a LoRALinear around it
    merge_lora(model)                             each LoRALinear -> its merged nn.Linear (W + alpha / r B A)
    write_adapter(folder, model, theirs, ...)     adapter_config.json + adapter_model.safetensors
    load_adapter(model, folder, theirs, base)     those files into a loaded base model, checked against it
    fingerprint(folder)                           {file name: sha256} of a model folder's safetensors files

PEFT's layout (peft/utils/save_and_load.py, get_peft_model_state_dict): a LoRA layer's two matrices are stored
as `base_model.model.<module>.lora_A.weight` and `.lora_B.weight`, <module> being the adapted layer's name in
the base model's own files (`model.layers.0.self_attn.q_proj` in Apple's layout, `model.language_model.layers.
0.self_attn.q_proj` in transformers'); a module trained in full (`modules_to_save`) keeps its tensors as
`base_model.model.<tensor name>`. adapter_config.json holds LoraConfig's fields, the base model's name in
`base_model_name_or_path`. The sha256 of each of the base's safetensors files goes in the adapter file's
metadata, since PEFT reads adapter_config.json into LoraConfig(**fields) and older versions refuse a field
they do not know: an adapter is checked against the files of the base it is put on, not against a name.
"""

import hashlib
import json
import math
import re
from pathlib import Path

import torch
import torch.nn as nn

import fastvlm as FV
from support.checkpoint import CheckpointError, safetensors_files, write_safetensors

# The layers LLaVA-1.5 adapts (llava/train/train.py, find_all_linear_names): every linear layer of the language
# model but its output head; in Qwen2 the attention's four projections and the MLP's three.
DECODER_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

ADAPTABLE = ("llm", "mm_projector")          # the parts whose linear layers may carry adapters
PREFIX = "base_model.model."
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


class AdapterError(CheckpointError):
    """An adapter that cannot be made or applied; the message says why and what to do."""


def matches(name, wanted):
    """PEFT's rule for a list of module names: the module's whole name, or its last dotted parts."""
    return name == wanted or name.endswith("." + wanted)


def adaptable(model):
    """{our module name: layer} for every linear layer that may carry an adapter (not the output head,
    which LLaVA leaves out too)."""
    return {name: m for name, m in model.named_modules()
            if type(m) is nn.Linear and name.split(".")[0] in ADAPTABLE and name != "llm.lm_head"}


def add_lora(model, r, alpha, dropout=0.0, names=DECODER_LAYERS, name_of=None):
    """Wrap every adaptable linear layer whose name matches one of `names` in a LoRALinear, in place;
    returns their (our) names. `name_of` maps our module names to those `names` are written in (an
    adapter file's base layout); each of `names` must match at least one layer."""
    name_of = name_of or (lambda name: name)
    layers = adaptable(model)
    chosen = {name: m for name, m in layers.items() if any(matches(name_of(name), t) for t in names)}
    for t in names:
        if not any(matches(name_of(name), t) for name in layers):
            raise AdapterError(f"LoRA layer name {t!r} matches no linear layer of the decoder or the projector; "
                               f"use names such as {', '.join(DECODER_LAYERS)}, mm_projector.0, mm_projector.2")
    for name, layer in chosen.items():
        if not 0 < r <= min(layer.in_features, layer.out_features):
            raise AdapterError(f"LoRA rank {r}: {name} maps {layer.in_features} -> {layer.out_features} features, "
                               f"so the rank must be between 1 and {min(layer.in_features, layer.out_features)}")
    for name, layer in chosen.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, FV.LoRALinear(layer, r, alpha, dropout))
    return list(chosen)


def lora_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, FV.LoRALinear)}


@torch.no_grad()
def merge_lora(model):
    """Every LoRALinear replaced by the plain layer W + (alpha / r) B A, in place; returns how many."""
    layers = lora_layers(model)
    for name, m in layers.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, m.merged())
    return len(layers)


def fingerprint(folder):
    """{file name: sha256 hex} of the folder's safetensors files. A file in the Hugging Face cache is a
    link to a blob named by its sha256 (huggingface_hub checks it on download), which is taken as it is."""
    found = {}
    for path in safetensors_files(folder):
        real = path.resolve()
        if real.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", real.name):
            found[path.name] = real.name
            continue
        digest = hashlib.sha256()
        with open(real, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
        found[path.name] = digest.hexdigest()
    return found


def module_theirs(theirs, name):
    """The name a base layout gives one of our modules (theirs: our tensor name -> the files')."""
    return theirs(name + ".weight").removesuffix(".weight")


def target_names(model, wrapped, theirs):
    """adapter_config.json's target_modules: a last name (q_proj, ...) where it picks out adapted layers
    only, the whole name in the base's layout elsewhere (a projector layer, `model.mm_projector.0`)."""
    everything = [module_theirs(theirs, n) for n in adaptable(model)] + [module_theirs(theirs, n) for n in wrapped]
    chosen = {module_theirs(theirs, n) for n in wrapped}
    short = {n.rsplit(".", 1)[-1] for n in chosen}
    short = {s for s in short if not s.isdigit() and all(n in chosen for n in everything if n.rsplit(".", 1)[-1] == s)}
    return sorted(short) + sorted(n for n in chosen if n.rsplit(".", 1)[-1] not in short)


def common_prefix(names):
    """The dotted prefix that every name shares."""
    common = []
    for pieces in zip(*[name.split(".") for name in names]):
        if len(set(pieces)) > 1:
            break
        common.append(pieces[0])
    return ".".join(common)


def saved_modules(model, part, theirs):
    """A part trained in full, as modules_to_save names it in the base's layout: the module that holds
    all of its tensors and nothing else (`model.mm_projector`), or else each of its top-level modules
    (the decoder: `model.embed_tokens`, `model.layers`, `model.norm`, `lm_head`)."""
    def module_of(key):                     # the module that holds a tensor, in the base's names
        return theirs(key).rsplit(".", 1)[0]

    others = [theirs(k) for k in model.state_dict() if not k.startswith(part + ".") and ".lora_" not in k]
    prefix = common_prefix([module_of(f"{part}.{k}") for k in getattr(model, part).state_dict()])
    if prefix and not any(name.startswith(prefix + ".") for name in others):
        return [prefix]
    return [common_prefix([module_of(f"{part}.{name}.{k}") for k in child.state_dict()])
            for name, child in getattr(model, part).named_children() if child.state_dict()]


def write_adapter(folder, model, theirs, base_name, base_sha256, r, alpha, dropout, full_parts=()):
    """adapter_config.json and adapter_model.safetensors in `folder` (which must exist): every LoRA
    matrix, and the tensors of the parts trained in full (`full_parts`, e.g. ("mm_projector",)), in
    float32 under PEFT's names for the base's layout (`theirs`)."""
    folder = Path(folder)
    layers = lora_layers(model)
    assert not any(name.split(".")[0] in full_parts for name in layers), "a part with adapters learns through them"
    tensors = {}
    for name, m in layers.items():
        key = PREFIX + module_theirs(theirs, name)
        tensors[key + ".lora_A.weight"] = m.lora_A.weight.detach().float().contiguous().clone()
        tensors[key + ".lora_B.weight"] = m.lora_B.weight.detach().float().contiguous().clone()
    for part in full_parts:
        for k, v in getattr(model, part).state_dict().items():
            tensors[PREFIX + theirs(f"{part}.{k}")] = (v.detach().float() if v.is_floating_point() else v).contiguous().clone()
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name, "revision": None,
              "r": r, "lora_alpha": alpha, "lora_dropout": dropout, "bias": "none", "fan_in_fan_out": False,
              "target_modules": target_names(model, list(layers), theirs),
              "modules_to_save": [m for p in full_parts for m in saved_modules(model, p, theirs)] or None,
              "init_lora_weights": True, "inference_mode": True, "use_rslora": False, "use_dora": False,
              "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None}
    write_safetensors(tensors, folder / WEIGHTS,
                      {"base_model": str(base_name), "base_model_sha256": json.dumps(base_sha256, sort_keys=True)})
    (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")


# LoraConfig fields that change what the stored matrices mean: only their plain-LoRA values are read (an
# initialisation such as PiSSA's or LoftQ's rewrites the base's weights, which this loader never sees).
UNSUPPORTED = {"use_dora": (False, None), "use_rslora": (False, None), "fan_in_fan_out": (False, None),
               "bias": ("none", None), "rank_pattern": ({}, None), "alpha_pattern": ({}, None),
               "layers_to_transform": (None,), "megatron_config": (None,), "exclude_modules": (None, []),
               "lora_bias": (False, None), "trainable_token_indices": (None,), "layer_replication": (None,),
               "init_lora_weights": (True, False, "gaussian", None), "alora_invocation_tokens": (None,),
               "target_parameters": (None, [])}


def positive_number(x, whole=False):
    """A finite number > 0 (an int where `whole`); never a bool, which JSON's true would give."""
    if isinstance(x, bool) or not isinstance(x, int if whole else (int, float)):
        return False
    try:
        return math.isfinite(float(x)) and x > 0
    except OverflowError:          # an integer beyond float's range
        return False


def read_adapter_config(folder):
    """An adapter folder's adapter_config.json, checked, or one line that says what is wrong with it."""
    folder = Path(folder)
    if not folder.exists():
        raise AdapterError(f"--adapter {folder} does not exist: point it at a folder written by train.py --lora")
    if not folder.is_dir():
        raise AdapterError(f"--adapter {folder} is a file: point it at the folder that holds {CONFIG}")
    if not (folder / CONFIG).is_file() and (folder / "config.json").is_file():
        raise AdapterError(f"{folder} is a model folder (config.json), not an adapter: pass it as --model")
    if not (folder / CONFIG).is_file():
        raise AdapterError(f"{folder} has no {CONFIG}: point --adapter at a folder written by train.py --lora "
                           "(or by PEFT's save_pretrained)")
    try:
        config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (ValueError, RecursionError) as e:
        raise AdapterError(f"{folder / CONFIG} is not valid JSON ({e}); the adapter is damaged: write it again") from None
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{folder} holds a {config.get('peft_type')!r} adapter; only LoRA adapters are read")
    for field, allowed in UNSUPPORTED.items():
        if config.get(field, allowed[0]) not in allowed:
            raise AdapterError(f"{folder / CONFIG}: {field} = {config[field]!r} is not supported here (plain LoRA "
                               f"only); merge the adapter with PEFT and pass the merged model as --model")
    r, alpha, modules = config.get("r"), config.get("lora_alpha"), config.get("target_modules")
    if isinstance(modules, str):
        raise AdapterError(f"{folder / CONFIG}: target_modules is a pattern ({modules!r}); only a list of module "
                           "names is read here: merge the adapter with PEFT and pass the merged model as --model")
    if not (positive_number(r, whole=True) and positive_number(alpha)
            and isinstance(modules, list) and modules and all(isinstance(t, str) for t in modules)):
        raise AdapterError(f"{folder / CONFIG}: r, lora_alpha or target_modules is missing or not valid (r {r!r:.20}, "
                           f"lora_alpha {alpha!r:.20}, target_modules {modules!r:.80}); the adapter is damaged: write it again")
    return config


def read_adapter(folder):
    """(config, tensors, metadata) of an adapter folder, or one line that says what is wrong with it."""
    from safetensors import safe_open

    folder = Path(folder)
    config = read_adapter_config(folder)
    path = folder / WEIGHTS
    if not path.is_file():
        pickled = (folder / "adapter_model.bin").is_file()
        raise AdapterError(f"{folder} has no {WEIGHTS}" + ("; its adapter_model.bin is pickled, which is refused "
                           "(unpickling can run code): save it again with PEFT's safe_serialization=True" if pickled
                           else "; the adapter is incomplete: write it again"))
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:   # safetensors raises its own types for truncated or non-safetensors files
        raise AdapterError(f"{path} is not a readable safetensors file ({e}); the adapter is damaged: write it again") from None
    return config, tensors, metadata


@torch.no_grad()
def load_adapter(model, folder, theirs, base_folder, dtype=None):
    """Put the adapter in `folder` into `model` (a base model just loaded from `base_folder`, whose
    layout names our tensors with `theirs`), unmerged; returns the adapter's config. Refused, in one
    line, when it was made for other base weights, or does not fit this model."""
    folder = Path(folder)
    config, tensors, metadata = read_adapter(folder)
    recorded = metadata.get("base_model_sha256")
    base = config.get("base_model_name_or_path") or metadata.get("base_model") or "another model"
    if recorded is not None:
        try:
            recorded = json.loads(recorded)
            if not (isinstance(recorded, dict) and all(isinstance(v, str) for v in recorded.values())):
                raise ValueError
        except ValueError:
            raise AdapterError(f"{folder / WEIGHTS}: its record of the base model is damaged; write the adapter again") from None
        if fingerprint(base_folder) != recorded:
            if Path(str(base)).exists() and Path(str(base)).resolve() == Path(base_folder).resolve():
                raise AdapterError(f"the weights of {base_folder} changed since the adapter {folder} was made (the "
                                   "sha256 differ): restore the base it was trained on, or train the adapter again")
            raise AdapterError(f"{folder} is an adapter for {base}, not for {base_folder} (the sha256 of their "
                               f"weights differ); pass --model {base}")
    ours = {theirs(k): k for k in model.state_dict()}                 # base tensor names, before any wrapping
    layers = {module_theirs(theirs, n): n for n in adaptable(model)}
    dtype = dtype or model.llm.dtype
    try:
        add_lora(model, config["r"], config["lora_alpha"], 0.0, config["target_modules"],
                 name_of=lambda name: module_theirs(theirs, name))
    except AdapterError as e:
        raise AdapterError(f"{folder} does not fit {base_folder}: {e}") from None
    own = model.state_dict(keep_vars=True)
    filled = set()
    for key, value in tensors.items():
        name = key.removeprefix(PREFIX)
        module, _, kind = name.rpartition(".lora_")
        if kind in ("A.weight", "B.weight") and module in layers:
            place = f"{layers[module]}.lora_{kind}"
        else:
            place = ours.get(name)
        if kind in ("A.weight", "B.weight") and place not in own:
            raise AdapterError(f"{folder / WEIGHTS}: '{key}' is a LoRA matrix of a layer that target_modules "
                               f"({', '.join(config['target_modules'])}) does not name: the config and the weights "
                               "disagree; the adapter is damaged: write it again")
        if not key.startswith(PREFIX) or place not in own:
            raise AdapterError(f"{folder / WEIGHTS}: tensor '{key}' has no place in {base_folder}'s model; the "
                               f"adapter is for {base}")
        if value.is_floating_point() != own[place].is_floating_point():
            raise AdapterError(f"{folder / WEIGHTS}: '{key}' is {str(value.dtype).removeprefix('torch.')} where the "
                               "model holds a floating-point tensor; the adapter is damaged: write it again")
        if tuple(own[place].shape) != tuple(value.shape):
            raise AdapterError(f"{folder / WEIGHTS}: '{key}' has shape {tuple(value.shape)} where the model holds "
                               f"{tuple(own[place].shape)}; the adapter is for {base}, or damaged")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise AdapterError(f"{folder / WEIGHTS}: '{key}' holds NaN or infinite values; the adapter is damaged "
                               "(did its training diverge?): write it again")
        own[place].copy_(value)
        filled.add(place)
    for name, m in lora_layers(model).items():
        for kind in ("lora_A", "lora_B"):
            if f"{name}.{kind}.weight" not in filled:
                raise AdapterError(f"{folder / WEIGHTS} lacks '{PREFIX}{module_theirs(theirs, name)}.{kind}.weight', "
                                   "which its config's target_modules ask for: the adapter is damaged")
        m.to(dtype)
    return config
