"""Model folders in, a FastVLM out: everything that reads (and names) what a user points --model at.

    load_model("apple/FastVLM-0.5B")  ->  (model, tokenizer, config dict)
      resolve_model      a folder, or a Hugging Face repo id found in the local cache (ORG/NAME)
      model_config       config.json: which layout, the encoder's and the decoder's sizes; every field
                         read, fixed or ignored is listed (READ_FIELDS, FIXED_FIELDS, IGNORED_FIELDS)
      load_tokenizer     tokenizer.json, or vocab.json + merges.txt
      checkpoint.py      every stored name and shape checked against the model before anything is
                         allocated; then one tensor at a time into the parameters
      speedups.apply     for inference, the faster kernels (fast=False keeps the plain model)

A FastVLM is published in two layouts, the same tensors under other names: Apple's LLaVA-Qwen2 layout
(the `llava-fastvithd_*` zips, the `apple/FastVLM-*` repos, train.py's output) and transformers'
`fast_vlm` layout. One table of names per layout (LLAVA, FAST_VLM) maps them onto fastvlm.FastVLM's.
"""

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import fastvlm as FV
import qwen2
import repmixer
from support import adapters, speedups
from support import tokenizer as tokenizer_files
from support.checkpoint import CheckpointError, iter_safetensors, load_exact, read_safetensors, safetensors_headers

VISION_PREFIX = "model.vision_tower.vision_tower.model."   # Apple's MobileCLIP wrapper around FastViTHD
PROJECTOR_PREFIX = "model.mm_projector."


def load_model(name, device="cpu", dtype=torch.float32, fold_batchnorm=True, fast=True, progress=False,
               quantize=None, adapter=None):
    """(model, tokenizer, config dict) from a FastVLM folder in any supported layout, or a Hugging Face
    repo id (`apple/FastVLM-0.5B`) found in the local cache (see resolve_model); `progress` shows a bar
    while the tensors load.

    The vision tower arrives in the official stored form (branches fused, ConvFFN BatchNorm kept).
    For inference the BatchNorm is folded too, then speedups.apply() swaps in the faster kernels
    (unless `fast=False`); train.py keeps the stored form and the plain modules (`fold_batchnorm=False`,
    which also leaves out the speed step: a model to train stays plain, whatever `fast` says).
    `quantize="int8"` gives the decoder int8 weights in that step (speedups.quantize_int8).
    `adapter`: a LoRA adapter folder (train.py --lora, or PEFT) put on the model unmerged, refused in one
    line when made for other weights (support/adapters.py); with `quantize` it is merged first, since
    int8 weights cannot take a float update beside them at the same cost.
    """
    if quantize is not None and not (fast and fold_batchnorm):
        raise ValueError("quantize is part of the speed step: it needs fast=True and fold_batchnorm=True")
    folder = resolve_model(name)
    layout, vision_cfg, llm_cfg, config = model_config(folder)
    tokenizer = load_tokenizer(folder)
    check_tokenizer(folder, tokenizer, llm_cfg, config)
    stored = safetensors_headers(folder)               # names, shapes and dtypes; no tensor data
    names = list(stored)
    if not any(name.startswith(layout.vision) for name in names):
        raise CheckpointError(not_fastvlm_tensors(folder, names, layout))
    llm_cfg = tied_as_stored(llm_cfg, names)
    device = torch.device(device)
    with torch.device("meta"):                          # shapes only, no memory: filled below
        model = FV.FastVLM(vision_cfg, llm_cfg)
    shown = {name: layout.theirs(name, vision_cfg) for name in model.state_dict()}

    def by_our_names(tensors):
        for name, t in tensors:
            ours = layout.ours(name, vision_cfg)
            if ours is not None:
                shown[ours] = name
                yield ours, t

    # Every stored name and shape against the model the config describes, and the model's size
    # against the memory left, before anything is allocated: a config.json that describes a far
    # larger model than its file is named by its first wrong key, not attempted.
    load_exact(model, by_our_names(stored.items()), where=part_of, file_names=shown)
    check_fits(folder, model, dtype, device)
    try:
        model = allocate(model, dtype, device)
    except RuntimeError as e:   # the memory went to someone else since (CPU: "can't allocate memory")
        if not isinstance(e, torch.OutOfMemoryError) and "allocate memory" not in str(e):
            raise
        raise CheckpointError(not_enough_memory(folder, model_bytes(model, dtype), None, dtype, device)) from None
    # One tensor at a time from the files into the parameters (on the device asked for): no second
    # copy of the model anywhere. Each tensor is checked for NaN/inf on the way (a pass over bytes
    # already in cache), so that a damaged checkpoint can be named when its answer breaks down.
    model.nonfinite_tensor = None

    def stream():
        for name, t in tqdm(iter_safetensors(folder, dtype), total=len(names), desc="loading", unit="tensor",
                            disable=None if progress else True, leave=False):   # None: only on a terminal
            if model.nonfinite_tensor is None and t.is_floating_point() and not torch.isfinite(t).all():
                model.nonfinite_tensor = name
            yield name, t

    load_exact(model, by_our_names(stream()), where=part_of, file_names=shown)
    model.layout = layout.name
    if adapter is not None:
        adapters.load_adapter(model, adapter, lambda key: layout.theirs(key, vision_cfg), folder, dtype)
        if quantize is not None:
            adapters.merge_lora(model)
    model.eval()                                        # already on `device`: allocated there
    if fold_batchnorm:
        model.vision_tower.reparameterize()             # the ConvFFN BatchNorms fold into their convs
        if fast:
            speedups.apply(model, quantize)
    return model, tokenizer, config


# ----------------------------------------------------------------------------------------------------
# Where a model is: a folder, or a Hub name.
# ----------------------------------------------------------------------------------------------------


# A Hugging Face repo id as huggingface_hub validates one (utils/_validators.py): ORG/NAME, each of ASCII
# letters, digits, '-', '_' and '.', starting and ending with a letter or digit, at most 96 characters.
HUB_REPO_ID = re.compile(r"\b[\w\-.]{1,96}\b/\b[\w\-.]{1,96}\b", re.ASCII)


def hub_repo_id(name):
    """Whether `name`, not an existing folder, is to be looked up as a Hugging Face repo id: it has the
    form ORG/NAME and nothing of it exists here. A name with a leading ./ or / or more than one slash is
    a path; so is one whose first part is a folder here (`models/fastvlm-tiy` is a typo in a path,
    `checkpoints/FastVLM-0.5B` with no `checkpoints` folder here may be either, and is looked up)."""
    text = str(name)
    if not HUB_REPO_ID.fullmatch(text) or "--" in text or ".." in text or text.endswith(".git"):
        return False
    try:
        return not Path(text.split("/")[0]).exists()
    except OSError:
        return False


def hub_cache():
    """The Hugging Face cache folder, found as huggingface_hub finds it (constants.py): HF_HUB_CACHE,
    else HUGGINGFACE_HUB_CACHE, else HF_HOME/hub, else XDG_CACHE_HOME/huggingface/hub, else
    ~/.cache/huggingface/hub."""
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    hub = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(hub)))


def near_miss(path):
    """' (did you mean X?)' for a missing folder whose name is close to one beside it, else ''."""
    import difflib
    import itertools

    parent = path.parent
    try:
        siblings = [p.name for p in itertools.islice(parent.iterdir(), 1000) if p.is_dir()]   # bounded
    except OSError:
        return ""
    close = difflib.get_close_matches(path.name, siblings, n=1, cutoff=0.8)
    return f" (did you mean {parent / close[0]}?)" if close else ""


def resolve_model(name):
    """A model folder from what a user typed: a local folder (it wins), or a Hugging Face repo id
    `ORG/NAME` (see hub_repo_id) looked up in the local Hugging Face cache (see hub_cache), downloaded
    there with huggingface_hub (if installed) when it is not cached and the Hub is not offline
    (`HF_HUB_OFFLINE`). Anything else that is not a folder is "model folder not found", with no Hub
    lookup; an ORG/NAME that is neither says both, why the Hub did not have it, and, when the Hub could
    not be asked, the `hf download` command that fetches it."""
    if not str(name):
        raise CheckpointError("the model name is empty; pass a model folder or a Hugging Face repo id")
    path = Path(name).expanduser()                  # `--model=~/x`: no shell expands a ~ after an =
    try:
        if path.is_dir():
            return path
        exists, is_file = path.exists(), path.is_file()
    except OSError as e:
        raise CheckpointError(f"cannot reach {path} ({e.strerror}); check its folder's permissions") from None
    if exists:
        what = "a file" if is_file else "not a folder (a pipe, a device or a socket)"
        raise CheckpointError(f"{path} is {what}, not a model folder; point at the folder that holds config.json")
    missing = f"model folder not found: {name}"
    repo = str(name)
    if not hub_repo_id(repo):
        why = near_miss(path)
        if not why and HUB_REPO_ID.fullmatch(repo) and Path(repo.split("/")[0]).is_dir():   # ORG is here
            why = (f" (a path, since {repo.split('/')[0]} is a folder here; an ORG/NAME is looked up as a "
                   "Hugging Face repo id only where no such folder is)")
        raise CheckpointError(f"{missing}{why}; pass the folder that holds config.json")
    hub = hub_cache()
    cached = hub / ("models--" + repo.replace("/", "--"))
    ref = cached / "refs" / "main"
    try:
        if ref.is_file() and (cached / "snapshots" / ref.read_text().strip()).is_dir():
            return cached / "snapshots" / ref.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {repo} in the Hugging Face cache {hub} ({e}); check its permissions") from None
    # ORG/NAME is a repo id or a folder not made yet (the README's `checkpoints/FastVLM-0.5B` before its
    # download): the message says what to do for either.
    nor = (f"{missing} (there is no folder {repo.split('/')[0]} here), nor is {repo} a cached or downloadable "
           "Hugging Face Hub repo")
    fetch = (f"run `hf download {repo}` where the Hub can be reached if it is a repo id, or, if it is meant as "
             f"a folder, download a release into it first (`hf download apple/FastVLM-0.5B --local-dir {repo}`)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"{nor} (it is not in the cache {hub}, and huggingface_hub is not installed to "
                              f"download it); pip install huggingface_hub, then {fetch}") from None
    offline = [v for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")           # as huggingface_hub reads them
               if os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")]
    if offline:
        raise CheckpointError(f"{nor} (it is not in the cache {hub}, and {offline[0]} is set); unset it to "
                              f"download, or {fetch}")
    try:
        return Path(snapshot_download(repo, cache_dir=hub,     # where the lookup above and `hf download` look
                                      allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja"]))
    except Exception as e:  # huggingface_hub raises its own types for unknown repos and network failures
        kinds = {c.__name__ for c in type(e).__mro__}
        if "GatedRepoError" in kinds:
            raise CheckpointError(f"{nor} (the Hub keeps it gated); accept its terms on "
                                  f"https://huggingface.co/{repo} and log in with `hf auth login`, or pass the "
                                  "folder that holds the model") from None
        if kinds & {"RepositoryNotFoundError", "RevisionNotFoundError"}:
            raise CheckpointError(f"{nor} (the Hub has no public repo {repo}); check the name, or pass the folder "
                                  "that holds the model") from None
        cause = e.__cause__ or e    # a network failure arrives wrapped in LocalEntryNotFoundError
        reason = f"{type(cause).__name__}: {(str(cause).splitlines() or ['no details'])[0][:200]}"
        unreachable = "LocalEntryNotFoundError" in kinds or isinstance(cause, (ConnectionError, TimeoutError)) \
            or type(cause).__module__.split(".")[0] in ("httpx", "httpcore", "requests", "urllib3")
        what = "the Hub could not be reached" if unreachable else "downloading it failed"
        raise CheckpointError(f"{nor} (it is not in the cache {hub}, and {what}: {reason}); {fetch}") from None


def read_config(folder):
    """config.json of a model folder, the one place it is read."""
    path = Path(folder) / "config.json"
    try:
        if not path.is_file() and (Path(folder) / adapters.CONFIG).is_file():
            raise CheckpointError(f"{folder} holds LoRA adapters, not a model: pass its base model as --model and "
                                  f"this folder as --adapter {folder}")
        if not path.is_file():
            raise CheckpointError(f"{folder} has no config.json, so it is not a model folder (or not a complete "
                                  "one); point at the folder that holds config.json")
        config = json.loads(path.read_text(encoding="utf-8"))
    except CheckpointError:        # a ValueError too, but not one of the JSON parser's
        raise
    except OSError as e:
        raise CheckpointError(f"{path} is not readable ({e.strerror}); check its permissions") from None
    except (ValueError, RecursionError) as e:          # JSON and UTF-8 errors are ValueErrors
        raise CheckpointError(f"{path} is not valid JSON ({str(e)[:200]}); re-download it") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} holds a JSON {type(config).__name__}, not a model config; re-download it")
    return config


# What the loader does with each field of config.json: Apple's flat LLaVA-Qwen2 config, transformers'
# `fast_vlm` config with its `text_config` and `vision_config` (tests/test_loading.py checks that every
# field of the published configs is listed here, and each read or fixed field has a test where another
# value changes what the user gets).
#
# Read: they decide the model.
READ_FIELDS = (
    "model_type",                    # the layout: llava_qwen2 (or none: Apple's) or fast_vlm; others refused
    "text_config", "vision_config",  # fast_vlm: where the language model's and the tower's fields are
    "fastvithd",                     # this project's full vision config, for towers other than the release's
    "mm_vision_tower",               # Apple's: mobileclip_l_<size>, the release's tower at <size> px
    "mm_projector_type", "mm_hidden_size",
    "architecture",                  # vision_config: timm's fastvit_mci3
    "image_seq_length", "projector_hidden_act", "multimodal_projector_bias",
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "rms_norm_eps", "rope_theta", "rope_parameters", "max_position_embeddings",
    "tokenizer_model_max_length",    # the context, with max_position_embeddings (Chat.context)
    "image_token_index",             # must be the tokenizer's <image> id (check_tokenizer)
    "tie_word_embeddings",           # read, but the file decides: tied_as_stored
    # The language model's, refused by qwen2.Qwen2Config.from_dict unless they describe the computation
    # of qwen2.py (SiLU, plain RoPE, full attention in every layer, head_dim = hidden_size / heads):
    "hidden_act", "rope_scaling", "use_sliding_window", "layer_types", "head_dim",
)


# Fixed: one value in every FastVLM; any other describes another model, which is refused rather than
# run wrongly. (Where a field is absent, the value here is what Apple's and transformers' code assume.)
FIXED_FIELDS = {
    "image_aspect_ratio": "pad",               # the preprocessing of this file (Apple's `pad`)
    "mm_patch_merge_type": "flat",             # the image tokens in one row
    "mm_use_im_start_end": False,              # no <im_start>/<im_end> around the image
    "mm_use_im_patch_token": False,            # no <im_patch> tokens
    "vision_feature_select_strategy": "full",  # transformers: every image token (there is no CLS to drop)
    "vision_feature_layer": -1,                # transformers: the tower's last feature map
}


# Ignored, and why that is right.
IGNORED_FIELDS = {
    "architectures": "model_type names the layout",
    "auto_map": "transformers' trust_remote_code classes",
    "transformers_version": "provenance",
    "attention_dropout": "dropout, a training option (0.0 in every release)",
    "bos_token_id": "Qwen2 adds no BOS token: the prompt starts with <|im_start|>",
    "eos_token_id": "an answer stops at <|im_end|> or <|endoftext|>, found by name in the tokenizer (STOP_TOKENS)",
    "pad_token_id": "padding of training batches",
    "tokenizer_padding_side": "padding of training batches",
    "initializer_range": "the initialisation of new weights",
    "freeze_mm_mlp_adapter": "an option of Apple's trainer",
    "tune_mm_mlp_adapter": "an option of Apple's trainer",
    "mm_projector_lr": "an option of Apple's trainer",
    "unfreeze_mm_vision_tower": "an option of Apple's trainer (its code builds the tower only when true; "
                                "this one always does)",
    "use_mm_proj": "the projector is always used",
    "use_cache": "the KV cache is always used",
    "image_grid_pinpoints": "only for image_aspect_ratio `anyres`, which is refused",
    "sliding_window": "only with use_sliding_window, which must be false",
    "max_window_layers": "only with use_sliding_window, which must be false",
    "mm_vision_select_layer": "ignored by Apple's MobileCLIP tower too: it returns its last feature map",
    "mm_vision_select_feature": "ignored by Apple's MobileCLIP tower too: every token is a patch token",
    "torch_dtype": "the dtype the weights are stored in: any float dtype is read and cast to the one asked "
                   "for (load_model's dtype, infer.py's --dtype)",
    "dtype": "transformers' name for torch_dtype",
    "do_pooling": "timm's classifier head, which FastVLM never runs",
    "global_pool": "timm's classifier head, which FastVLM never runs",
    "num_classes": "timm's classifier head, which FastVLM never runs",
    "label_names": "timm's classifier head, which FastVLM never runs",
    "model_args": "timm's build options (inference_mode: the fused form, which the stored names give)",
}


def check_fixed_fields(config, text):
    """Refuse a config whose FIXED_FIELDS describe another model, or whose text_config is not a Qwen2's."""
    for field, value in FIXED_FIELDS.items():
        if field in config and config[field] != value:
            raise CheckpointError(f"config.json: {field} {config[field]!r} is not supported (every FastVLM has "
                                  f"{value!r}): this is another model")
    if text is not config and text.get("model_type", "qwen2") != "qwen2":
        raise CheckpointError(f"config.json: text_config model_type {text['model_type']!r} is not supported "
                              "(expected qwen2)")


def model_config(folder):
    """(layout, vision config, Qwen2 config, config dict) of a model folder, the layout named by config.json:
    transformers' `fast_vlm` (`text_config` and `vision_config` nested) or Apple's LLaVA-Qwen2 (flat).
    See READ_FIELDS, FIXED_FIELDS and IGNORED_FIELDS for what each field does."""
    folder = Path(folder)
    packages = sorted(p.name for p in folder.glob("*.mlpackage"))
    if packages:
        raise CheckpointError(f"{folder} is an export for Apple-silicon apps: its vision tower is a CoreML package "
                              f"({packages[0]}), which runs only there; use the PyTorch release "
                              "(apple/FastVLM-0.5B, -1.5B or -7B)")
    config = read_config(folder)
    kind = config.get("model_type")
    if kind == "fast_vlm":
        layout, text = FAST_VLM, config.get("text_config")
        if not isinstance(text, dict):
            raise CheckpointError("config.json: a fast_vlm config needs a text_config object; re-download it")
    elif kind in ("llava_qwen2", None):
        layout, text = LLAVA, config
    else:
        raise CheckpointError(f"config.json: model_type {kind!r} is not FastVLM (expected Apple's llava_qwen2 "
                              "or transformers' fast_vlm)")
    check_fixed_fields(config, text)
    vision_cfg = vision_config(config)
    try:
        llm_cfg = qwen2.Qwen2Config.from_dict(text)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"config.json: {e}; the file is damaged or not for this model") from None
    context = config.get("tokenizer_model_max_length", 8192)
    if not isinstance(context, int) or isinstance(context, bool) or context < 1:
        raise CheckpointError(f"config.json: tokenizer_model_max_length must be a positive integer, not {context!r}")
    return layout, vision_cfg, llm_cfg, config


def vision_config(config):
    """The FastViTHD config named by config.json. Apple's layout names the tower `mobileclip_l_<size>` (the
    release at <size> px); transformers' names timm's `fastvit_mci3`, its size given by the number of
    image tokens. Folders of small models (train.py's, or converted from them) add a `fastvithd` entry
    with the whole config, which the layout's other fields must agree with."""
    custom = None
    if "fastvithd" in config:
        try:
            custom = repmixer.FastViTHDConfig.from_dict(config["fastvithd"])
        except (AttributeError, TypeError, ValueError) as e:
            raise CheckpointError(f"config.json: the 'fastvithd' entry is not a valid config ({e})") from None
    if config.get("model_type") == "fast_vlm":
        vision = config.get("vision_config")
        arch = vision.get("architecture") if isinstance(vision, dict) else None
        if arch != "fastvit_mci3":
            raise CheckpointError(f"config.json: vision tower {arch!r} is not supported (expected fastvit_mci3)")
        if config.get("projector_hidden_act", "gelu") != "gelu" or not config.get("multimodal_projector_bias", True):
            raise CheckpointError("config.json: only the GELU projector with biases (mlp2x_gelu) is supported")
        tokens = config.get("image_seq_length", 256 if custom is None else custom.num_tokens())
        side = round(tokens ** 0.5) if isinstance(tokens, int) and tokens > 0 else 0
        if side * side != tokens:
            raise CheckpointError(f"config.json: image_seq_length {tokens!r} is not a square number of tokens")
        cfg = custom or repmixer.FastViTHDConfig(image_size=64 * side)
        if cfg.num_tokens() != tokens:
            raise CheckpointError(f"config.json: image_seq_length {tokens} does not match the vision tower's "
                                  f"{cfg.num_tokens()} tokens")
        hidden, what = vision.get("hidden_size", cfg.out_channels), "vision_config hidden_size"
    else:
        tower = config.get("mm_vision_tower", "")
        if custom is not None:                           # the entry describes the tower; the name is a label
            cfg = custom
        elif isinstance(tower, str) and re.fullmatch(r"mobileclip_l_\d+", tower):
            try:
                cfg = repmixer.FastViTHDConfig(image_size=int(tower.rsplit("_", 1)[1]))
            except ValueError as e:
                raise CheckpointError(f"config.json: mm_vision_tower {tower!r}: {e}") from None
        else:
            raise CheckpointError(f"config.json: vision tower {tower!r} is not supported (expected mobileclip_l_<size>)")
        projector = config.get("mm_projector_type", "mlp2x_gelu")
        if projector != "mlp2x_gelu":
            raise CheckpointError(f"config.json: projector {projector!r} is not supported (expected mlp2x_gelu)")
        hidden, what = config.get("mm_hidden_size", cfg.out_channels), "mm_hidden_size"
    if hidden != cfg.out_channels:
        raise CheckpointError(f"config.json: {what} {hidden!r} does not match the vision tower's "
                              f"{cfg.out_channels} channels")
    return cfg


def not_fastvlm_tensors(folder, names, layout):
    """The line for a folder whose weights hold no vision tower where its config's layout puts it."""
    if any(n.startswith(("language_model.", "vision_tower.")) or n.endswith(".scales") for n in names):
        return (f"{folder} holds weights in mlx-vlm's MLX layout (names like '{names[0]}', often quantized), "
                "which only MLX runs; use the PyTorch release (apple/FastVLM-0.5B, -1.5B or -7B)")
    return (f"{folder}: no vision-tower tensors under '{layout.vision}', where its config.json ({layout.name} "
            "layout) puts them: not a FastVLM checkpoint")


def llava_config(vision_cfg, llm_cfg, base=None):
    """config.json of Apple's LLaVA-Qwen2 layout for these configs (over `base`, e.g. the config it
    started from). A vision tower other than the release's at some size also gets a `fastvithd` entry."""
    cfg = {key: value for key, value in (base or {}).items() if key not in ("text_config", "vision_config")}
    cfg.update(asdict(llm_cfg))
    cfg.update({"architectures": ["LlavaQwen2ForCausalLM"], "model_type": "llava_qwen2",
                "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": vision_cfg.out_channels,
                "image_aspect_ratio": "pad", "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
                "unfreeze_mm_vision_tower": True, "tokenizer_model_max_length": cfg.get("tokenizer_model_max_length", 8192)})
    if vision_cfg == repmixer.FastViTHDConfig(image_size=vision_cfg.image_size):
        cfg["mm_vision_tower"] = f"mobileclip_l_{vision_cfg.image_size}"
        cfg.pop("fastvithd", None)
    else:
        cfg["mm_vision_tower"] = f"fastvithd_custom_{vision_cfg.image_size}"
        cfg["fastvithd"] = asdict(vision_cfg)
    return cfg


def fast_vlm_config(vision_cfg, llm_cfg, image_token_index, dtype="bfloat16"):
    """config.json of transformers' `fast_vlm` layout for these configs (as its save_pretrained writes it;
    the vision tower is timm's `fastvit_mci3` in its inference form). A vision tower other than the
    release's also gets a `fastvithd` entry, which this file reads and transformers ignores."""
    text = asdict(llm_cfg)
    rope_theta = text.pop("rope_theta")
    text.update({"model_type": "qwen2", "hidden_act": "silu", "attention_dropout": 0.0, "initializer_range": 0.02,
                 "layer_types": ["full_attention"] * llm_cfg.num_hidden_layers, "max_window_layers": 28,
                 "rope_parameters": {"rope_theta": rope_theta, "rope_type": "default"}, "sliding_window": None,
                 "use_sliding_window": False, "use_cache": True, "bos_token_id": None, "eos_token_id": None,
                 "pad_token_id": None, "dtype": dtype})
    cfg = {"architectures": ["FastVlmForConditionalGeneration"], "model_type": "fast_vlm",
           "image_token_index": image_token_index, "image_seq_length": vision_cfg.num_tokens(),
           "multimodal_projector_bias": True, "projector_hidden_act": "gelu", "text_config": text,
           "tie_word_embeddings": llm_cfg.tie_word_embeddings, "dtype": dtype,
           "vision_config": {"architecture": "fastvit_mci3", "model_type": "timm_wrapper", "do_pooling": True,
                             "global_pool": "avg", "hidden_size": vision_cfg.out_channels, "initializer_range": 0.02,
                             "num_classes": 2, "label_names": ["LABEL_0", "LABEL_1"],
                             "model_args": {"inference_mode": True}},
           "vision_feature_layer": -1, "vision_feature_select_strategy": "full"}
    if vision_cfg != repmixer.FastViTHDConfig(image_size=vision_cfg.image_size):
        cfg["fastvithd"] = asdict(vision_cfg)
    return cfg


def official_network_layout(cfg):
    """Apple's flat `network` list -> (stage, part) for each index: blocks, [downsample], [cpe], blocks, ..."""
    layout = []
    for i, mixer in enumerate(cfg.mixers):
        if i > 0:
            layout.append((i, "downsample"))
        if mixer == "attention":
            layout.append((i, "cpe"))
        layout.append((i, "blocks"))
    return layout


# (official, ours) fragments of vision-tower names. A leading ^ anchors at the start of the name. Order
# matters: the downsampling patterns come before the generic `reparam_conv` <-> `fused`, both ways.
_RENAMES = [
    ("^patch_embed.", "^stem."),
    ("^conv_exp.", "^expand."),
    ("downsample.proj.0.lkb_reparam.", "downsample.spatial.fused."),
    ("downsample.proj.1.reparam_conv.", "downsample.pointwise.fused."),
    ("convffn.conv.conv.", "convffn.local.conv."),
    ("convffn.conv.bn.", "convffn.local.bn."),
    ("reparam_conv.", "fused."),
]


UNUSED_OFFICIAL = ("head.",)  # MobileCLIP's projection head: computed by Apple's forward, never used


def _rename(key, to_ours, rules=_RENAMES):
    """Apply (theirs, ours) fragment renames in order; ^ anchors a fragment at the start, $ at the end."""
    for theirs, ours in rules:
        src, dst = (theirs, ours) if to_ours else (ours, theirs)
        if src.startswith("^"):
            if key.startswith(src[1:]):
                key = dst[1:] + key[len(src) - 1:]
        elif src.endswith("$"):
            if key.endswith(src[:-1]):
                key = key[:len(key) - len(src) + 1] + dst[:-1]
        else:
            key = key.replace(src, dst, 1)
    return key


def official_key(key, cfg=repmixer.FASTVITHD):
    """Our parameter name for an official vision-tower key (prefix removed); None for the unused head.

    e.g. `network.7.0.token_mixer.qkv.weight` -> `stages.3.blocks.0.token_mixer.qkv.weight`.
    """
    if key.startswith(UNUSED_OFFICIAL):
        return None
    m = re.match(r"network\.(\d+)\.(.*)", key)
    if m:
        layout = official_network_layout(cfg)
        if int(m.group(1)) >= len(layout):
            raise CheckpointError(f"vision tower: unexpected tensor '{key}': this config has no network.{m.group(1)}")
        stage, part = layout[int(m.group(1))]
        key = f"stages.{stage}.{part}.{m.group(2)}"
    return _rename(key, to_ours=True)


def to_official_key(key, cfg=repmixer.FASTVITHD):
    """The inverse of official_key: our name -> Apple's (prefix not added), for writing checkpoints."""
    key = _rename(key, to_ours=False)
    m = re.match(r"stages\.(\d+)\.(downsample|cpe|blocks)\.(.*)", key)
    if m:
        index = official_network_layout(cfg).index((int(m.group(1)), m.group(2)))
        key = f"network.{index}.{m.group(3)}"
    return key


def check_tokenizer(folder, tokenizer, llm_cfg, config):
    """The tokenizer must belong to the model: no more tokens than embedding rows, and the `<image>` id
    of a config that names one (transformers' `image_token_index`) must be the tokenizer's."""
    if len(tokenizer) > llm_cfg.vocab_size:
        raise CheckpointError(f"{folder}: the tokenizer has {len(tokenizer):,} tokens but the model's embedding "
                              f"{llm_cfg.vocab_size:,} rows: they are not from the same model")
    index = config.get("image_token_index")
    if index is not None and index != tokenizer.token_id(FV.IMAGE):
        raise CheckpointError(f"{folder}: config.json's image_token_index is {index!r} but the tokenizer's {FV.IMAGE} "
                              f"token is {tokenizer.token_id(FV.IMAGE)!r}: they are not from the same model")


def model_bytes(model, dtype=None):
    """Bytes that `allocate(model, dtype)` takes for the weights: every parameter and stored buffer once
    (a tied head is one tensor), floating ones in `dtype` (default: as they are), integer ones as they are."""
    unique = {id(t): t for t in model.state_dict(keep_vars=True).values()}.values()
    width = torch.empty((), dtype=dtype).element_size() if dtype is not None else None
    return sum(t.numel() * (width if width and t.is_floating_point() else t.element_size()) for t in unique)


def free_memory(device):
    """Bytes a new allocation on `device` can still get, or None where this cannot be told: a GPU's free
    memory; for the CPU (and Apple's GPUs, which share it) Linux's MemAvailable plus free swap."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        return (int(fields["MemAvailable"].split()[0]) + int(fields.get("SwapFree", "0").split()[0])) * 1024
    except (OSError, KeyError, ValueError, IndexError):    # not Linux: nothing to compare with
        return None


def size_text(n):
    """Bytes for people: GiB from one GiB up, else MiB."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_fits(folder, model, dtype, device):
    """Refuse, in one line, a model (built on the meta device) whose weights cannot fit in what `device`
    has free; nothing is allocated before this check."""
    need, free = model_bytes(model, dtype), free_memory(device)
    if free is not None and need > free:
        raise CheckpointError(not_enough_memory(folder, need, free, dtype, device))


def not_enough_memory(folder, need, free, dtype, device):
    """The line for a model that does not fit: its size, what is free, and how to make it smaller."""
    dtype = dtype or torch.float32
    where = f"the GPU ({device})" if device.type == "cuda" else "this machine"
    has = "could not allocate it" if free is None else f"has {size_text(free)} free"
    smaller = "load it in bfloat16 (--dtype bfloat16) or " if dtype.itemsize > 2 else ""
    return (f"{folder}: the model needs {size_text(need)} in {str(dtype).removeprefix('torch.')} but {where} "
            f"{has}; {smaller}use a machine with more memory")


def allocate(model, dtype=None, device="cpu"):
    """A model built on the meta device -> the same model on `device` in `dtype`, its tensors allocated
    but not initialised (every one is filled by the loader): each tensor once, a tied head's too. The
    computed RoPE tables, which to_empty() cannot keep, are computed again."""
    for m in model.modules():       # a tied head's tensor is the embedding's: to_empty would allocate it
        if isinstance(m, qwen2.Qwen2) and m.cfg.tie_word_embeddings:    # again (on a GPU at once, 272 MB
            m.lm_head.weight = None                                      # for the 0.5B model)
    model = model.to(dtype).to_empty(device=device) if dtype is not None else model.to_empty(device=device)
    for m in model.modules():
        if isinstance(m, qwen2.Qwen2):
            if m.cfg.tie_word_embeddings:
                m.lm_head.weight = m.embed_tokens.weight
            m.build_rope(4096, device)
    return model


# timm's `fastvit_mci3` names of the fused vision tower (transformers' `fast_vlm` layout stores it as
# `model.vision_tower.timm_model.*`) -> ours. timm keeps the stage structure we use, so only the block
# names differ. A trailing $ anchors at the end of the name (layer scales are `gamma` parameters there).
_TIMM_RENAMES = [
    ("^final_conv.", "^expand."),
    ("downsample.proj.0.reparam_conv.", "downsample.spatial.fused."),
    ("downsample.proj.1.reparam_conv.", "downsample.pointwise.fused."),
    ("pos_emb.reparam_conv.", "cpe.fused."),
    ("se.fc1.", "se.reduce."),
    ("se.fc2.", "se.expand."),
    ("mlp.conv.", "convffn.local."),
    ("mlp.fc", "convffn.fc"),
    ("layer_scale.gamma$", "layer_scale$"),
    ("layer_scale_1.gamma$", "layer_scale_1$"),
    ("layer_scale_2.gamma$", "layer_scale_2$"),
    ("reparam_conv.", "fused."),
]


def timm_key(key):
    """Our vision-tower name for a timm `fastvit_mci3` key, e.g. `stages.3.pos_emb.reparam_conv.weight`
    -> `stages.3.cpe.fused.weight` (timm's names already follow our stages: no config needed)."""
    return _rename(key, to_ours=True, rules=_TIMM_RENAMES)


def to_timm_key(key):
    """The inverse of timm_key."""
    return _rename(key, to_ours=False, rules=_TIMM_RENAMES)


@dataclass(frozen=True)
class Layout:
    """Where each part of FastVLM lives in one publisher's files. `lm_head.weight` is top level in
    both (and absent when the head is tied to the embedding)."""
    name: str
    vision: str               # prefix of the vision tower's tensors
    projector: tuple          # prefixes of the projector's two linear layers (ours: mm_projector.0 and .2)
    llm: str                  # prefix of the language model's other tensors
    vision_to_ours: object    # (key without prefix, vision config) -> our key, None for a tensor never used
    vision_to_theirs: object  # (our key, vision config) -> theirs

    def ours(self, name, cfg):
        """Our FastVLM name of a tensor in this layout's files (vision config `cfg`); None for a tensor
        the model never uses (the MobileCLIP head of Apple's files). A name of no known part is returned
        as it is, for the loader to report as unexpected."""
        if name.startswith(self.vision):
            key = self.vision_to_ours(name[len(self.vision):], cfg)
            return None if key is None else "vision_tower." + key
        for index, prefix in zip((0, 2), self.projector):
            if name.startswith(prefix):
                return f"mm_projector.{index}." + name[len(prefix):]
        if name.startswith("lm_head."):
            return "llm." + name
        if name.startswith(self.llm):
            return "llm." + name[len(self.llm):]
        return name

    def theirs(self, name, cfg):
        """The inverse of `ours`: the name this layout's files give one of our tensors."""
        part, key = name.split(".", 1)
        if part == "vision_tower":
            return self.vision + self.vision_to_theirs(key, cfg)
        if part == "mm_projector":
            index, rest = key.split(".", 1)
            return self.projector[int(index) // 2] + rest
        return key if key.startswith("lm_head.") else self.llm + key


# Apple's LLaVA-Qwen2 layout: the `llava-fastvithd_*` zips, the `apple/FastVLM-*` repos, train.py's output.
LLAVA = Layout("llava", VISION_PREFIX, (PROJECTOR_PREFIX + "0.", PROJECTOR_PREFIX + "2."), "model.",
               official_key, to_official_key)


# transformers' own layout (`model_type: fast_vlm`, FastVlmForConditionalGeneration.save_pretrained).
FAST_VLM = Layout("fast_vlm", "model.vision_tower.timm_model.",
                  ("model.multi_modal_projector.linear_1.", "model.multi_modal_projector.linear_2."),
                  "model.language_model.", lambda key, cfg: timm_key(key), lambda key, cfg: to_timm_key(key))

LAYOUTS = {layout.name: layout for layout in (LLAVA, FAST_VLM)}       # by the name a loaded model's .layout holds


def part_of(name):
    """Which part of FastVLM one of our names belongs to, for error messages."""
    return {"vision_tower": "vision tower", "mm_projector": "projector"}.get(name.split(".", 1)[0], "language model")


def tied_as_stored(cfg, names):
    """`cfg` with the head tied unless the stored tensor names hold `lm_head.weight` (top level in every
    layout), whatever config.json says: Apple notes that some exported checkpoints' flag disagrees with
    their files."""
    return qwen2.Qwen2Config(**{**cfg.__dict__, "tie_word_embeddings": "lm_head.weight" not in names})


def load_llm(cfg, tensors, dtype=None, device="cpu"):
    """Build a Qwen2 for `cfg` and fill it from HF-named tensors (`model.layers.0...`, `lm_head.weight`).

    The head is tied when the file has no `lm_head.weight`, whatever config.json says (Apple notes that
    some exported checkpoints' flag disagrees with their files).
    """
    cfg = tied_as_stored(cfg, tensors)
    with torch.device("meta"):                              # no time spent on a random init
        model = allocate(qwen2.Qwen2(cfg), dtype, device)
    fill_llm(model, tensors)
    return model.eval()


def fill_llm(model, tensors):
    """load_exact for a Qwen2 and HF-named tensors, errors naming the keys as the file does."""
    ours = {name.removeprefix("model."): value for name, value in tensors.items()}
    file_names = {name: name if name.startswith("lm_head.") else "model." + name for name in model.state_dict()}
    load_exact(model, ours, where="language model",
               file_names={**file_names, **{name.removeprefix("model."): name for name in tensors}})


def load_qwen2(folder, dtype=None, device="cpu"):
    """An HF-format Qwen2 folder (config.json + model.safetensors, or shards with an index), e.g. the
    language model a new FastVLM starts from (train.py --init-llm). As in load_model, the stored
    names and shapes are checked against the config, and the size against the memory, before any tensor
    is read or allocated."""
    config = read_config(folder)
    try:
        cfg = qwen2.Qwen2Config.from_dict(config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{folder}/config.json: {e}; the file is damaged or not for this model") from None
    stored = safetensors_headers(folder)
    with torch.device("meta"):
        skeleton = qwen2.Qwen2(tied_as_stored(cfg, stored))
    fill_llm(skeleton, stored)
    check_fits(folder, skeleton, dtype, torch.device(device))
    return load_llm(cfg, read_safetensors(folder, dtype=dtype), dtype, device)


TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "added_tokens.json", "special_tokens_map.json",
                   "tokenizer_config.json")


def load_tokenizer(folder):
    """Qwen2's tokenizer from a model folder: `tokenizer.json`, or the slow tokenizer's `vocab.json` +
    `merges.txt` (+ `added_tokens.json`) that the official LLaVA checkpoints ship."""
    folder = Path(folder)
    try:
        if (folder / "tokenizer.json").is_file():
            tokenizer = tokenizer_files.Tokenizer.from_json((folder / "tokenizer.json").read_text(encoding="utf-8"))
        elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
            merges = []
            for line in (folder / "merges.txt").read_text(encoding="utf-8").splitlines():
                line = line.rstrip("\r")               # some copies ship CRLF line endings
                if line and not line.startswith("#version"):
                    merges.append(tuple(line.split(" ")))
            specials = dict(tokenizer_files.SPECIAL_TOKENS)
            if (folder / "added_tokens.json").is_file():
                specials.update(json.loads((folder / "added_tokens.json").read_text(encoding="utf-8")))
            tokenizer = tokenizer_files.Tokenizer.from_vocab(vocab, merges, specials)
        else:
            raise CheckpointError(f"{folder} has no tokenizer (tokenizer.json, or vocab.json + merges.txt)")
    except CheckpointError:
        raise
    except tokenizer_files.TokenizerMismatch as e:
        raise CheckpointError(f"{folder}: {e}: not the Qwen2 tokenizer this model needs") from None
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # json and the tokenizers library raise their own types (a Rust panic too)
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise CheckpointError(f"{folder}: the tokenizer files are not readable ({first}); re-download them") from None
    missing = [t for t in ("<|im_start|>", "<|im_end|>") if tokenizer.token_id(t) is None]
    if missing:
        raise CheckpointError(f"{folder}: the tokenizer has no {missing[0]} token: not the Qwen2 chat tokenizer "
                              "this model needs")
    tokenizer.source_folder = folder                    # save_tokenizer copies these files as they are
    return tokenizer


def save_tokenizer(tokenizer, folder):
    """Write the tokenizer into a model folder: the files it was read from, as they were, or tokenizer.json."""
    folder = Path(folder)
    source = getattr(tokenizer, "source_folder", None)
    copied = [shutil.copy(source / f, folder / f) for f in TOKENIZER_FILES
              if source is not None and (source / f).is_file()]
    if not copied:
        tokenizer.tok.save(str(folder / "tokenizer.json"))
