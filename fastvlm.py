"""FastVLM end to end (paper Sec. 3, Fig. 2): image -> FastViTHD -> MLP projector -> Qwen2 -> answer.

    image file --preprocess--> (1, 3, 1024, 1024) in [0, 1]
      --FastViTHD (repmixer.py)--> (1, 3072, 16, 16) --flatten--> (1, 256, 3072) visual tokens
      --projector: Linear(3072, d), GELU, Linear(d, d)--> (1, 256, d)
    prompt "<|im_start|>system ... user\n<image>\n{question}<|im_end|>\n<|im_start|>assistant\n"
      --tokenize, embed; the 256 projected tokens replace <image>--> (1, T + 256, d)
      --Qwen2 (qwen2.py): prefill, then one token at a time through the KV cache--> answer

Time to first token (TTFT), the paper's headline metric, is preprocessing + encoder + projector +
prefill: everything before the first decode step. `Chat` records each part.

`FastVLM.from_pretrained(folder)` reads an official checkpoint folder (Apple's
`llava-fastvithd_*` or the `apple/FastVLM-*` repos: config.json, safetensors, slow-tokenizer files)
or one written by train.py, with every tensor consumed and every parameter filled. All reading of
model folders lives in this file: the config, the official tensor names of both halves, the tokenizer
files. For CPU inference it then applies speedups.py's one step, which swaps modules for faster
kernels without changing a parameter (`fast=False` keeps the plain model).
"""

import json
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image, ImageOps

import qwen2
import repmixer
import speedups
from checkpoint import CheckpointError, iter_safetensors, load_exact, read_safetensors, safetensors_names

# The `qwen_2` conversation template of Apple's llava/conversation.py.
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
USER, ASSISTANT, END = "<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>\n"
IMAGE = "<image>"
IMAGE_TOKEN_INDEX = -200          # the placeholder id of <image> in input_ids (llava/constants.py)
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")
VISION_PREFIX = "model.vision_tower.vision_tower.model."   # Apple's MobileCLIP wrapper around FastViTHD
PROJECTOR_PREFIX = "model.mm_projector."


class InputError(ValueError):
    """Bad user input (image, question, options); the message says what is wrong and what to do."""


# ----------------------------------------------------------------------------------------------------
# Preprocessing: exactly the official `image_aspect_ratio: pad` pipeline.
# ----------------------------------------------------------------------------------------------------

def load_image(path):
    """Open an image file as 8-bit RGB, upright according to its EXIF orientation.

    EXIF orientation is a deliberate difference from Apple's code (which ignores it, so phone photos
    can arrive sideways). 16-bit images are scaled to 8 bits (PIL's own conversion would clip them).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()                                   # decode now, so a truncated file fails here
            img = ImageOps.exif_transpose(img)
    except Image.DecompressionBombError as e:
        raise InputError(f"{path} is too large to decode safely ({e}); resize it first") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"{path} is not a readable image ({e}); pass a PNG, JPEG or similar") from None
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # high bit depth grayscale
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


def expand_to_square(img, fill=(0, 0, 0)):
    """Pad to a square with the background colour, image centred (odd pixel right/bottom)."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new(img.mode, (side, side), fill)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def preprocess(img, size):
    """RGB PIL image -> (3, size, size) float32 in [0, 1], as Apple's pipeline computes it.

    Pad to square with black (the background is mean * 255 and MobileCLIP's mean is 0), resize with
    PIL bicubic on the 8-bit image, divide by 255 in float32 (the correctly rounded k/255), and
    normalise with mean 0 / std 1, which leaves the values as they are.
    """
    img = expand_to_square(img).resize((size, size), Image.BICUBIC)
    x = np.asarray(img, dtype=np.float32) / np.float32(255.0)          # (size, size, 3)
    return torch.from_numpy(x).permute(2, 0, 1).contiguous()


# ----------------------------------------------------------------------------------------------------
# The prompt.
# ----------------------------------------------------------------------------------------------------

def first_turn(question):
    """The full first-turn prompt text; the image goes where <image> stands."""
    return SYSTEM + USER + IMAGE + "\n" + question + END + ASSISTANT


def next_turn(question):
    """What follows an answer in the cache: its end marker, then the next user turn."""
    return END + USER + question + END + ASSISTANT


def tokenize_with_image(tokenizer, text):
    """Token ids of `text`, each <image> replaced by IMAGE_TOKEN_INDEX (pieces tokenized separately).

    For text whose <image> markers are meant as such: the template, and training data."""
    ids = []
    for i, piece in enumerate(text.split(IMAGE)):
        if i:
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(tokenizer.encode(piece))
    return ids


def turn_ids(tokenizer, question, first):
    """Token ids of one user turn (the first with the system prompt and the image placeholder).

    User text is only text: the placeholder goes where the template puts it, and an `<image>` typed in
    the question is tokenized as the characters it is. For any other question the ids equal
    `tokenize_with_image(tokenizer, first_turn(question))` (or `next_turn` for a follow-up)."""
    if not first:
        return tokenizer.encode(next_turn(question))
    return tokenizer.encode(SYSTEM + USER) + [IMAGE_TOKEN_INDEX] + tokenizer.encode("\n" + question + END + ASSISTANT)


# ----------------------------------------------------------------------------------------------------
# The model.
# ----------------------------------------------------------------------------------------------------

class FastVLM(nn.Module):
    def __init__(self, vision_cfg=repmixer.FASTVITHD, llm_cfg=qwen2.QWEN2_0_5B, fused=True):
        super().__init__()
        self.vision_tower = repmixer.FastViTHD(vision_cfg, fused=fused)
        d = llm_cfg.hidden_size
        # `mlp2x_gelu`: two linear layers with a GELU between (LLaVA-1.5's connector)
        self.mm_projector = nn.Sequential(nn.Linear(vision_cfg.out_channels, d), nn.GELU(), nn.Linear(d, d))
        self.llm = qwen2.Qwen2(llm_cfg)

    @property
    def image_size(self):
        return self.vision_tower.cfg.image_size

    def encode_image(self, pixels, timing=None):
        """(B, 3, S, S) -> (B, (S/64)^2, d): visual tokens in the LLM's embedding space.

        Inference and training both encode here; `timing` (a Timing) records the encoder and projector.
        """
        features = self.vision_tower(pixels)                    # (B, 3072, S/64, S/64)
        if timing is not None:
            timing.lap("encoder")
        embeds = self.mm_projector(repmixer.to_tokens(features))  # (B, (S/64)^2, 3072) -> (B, (S/64)^2, d)
        if timing is not None:
            timing.lap("projector")
        return embeds

    def splice(self, ids, image_embeds=None):
        """(T,) ids with at most one IMAGE_TOKEN_INDEX -> (T - 1 + N, d): the N image tokens stand where
        the placeholder stood, every other id is embedded. The one splice of inference and training."""
        at = (ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist()
        if len(at) > (0 if image_embeds is None else 1):
            raise ValueError("one image per conversation: the prompt has more <image> markers than images")
        if not at:
            return self.llm.embed_tokens(ids)
        return torch.cat([self.llm.embed_tokens(ids[:at[0]]), image_embeds, self.llm.embed_tokens(ids[at[0] + 1:])])

    def embed(self, ids, image_embeds=None):
        """A prompt's ids (list or (T,)) and the image's (1, N, d) embeddings -> (1, T', d) for the LLM."""
        ids = torch.as_tensor(ids, device=self.llm.device)
        return self.splice(ids, None if image_embeds is None else image_embeds[0])[None]

    def forward(self, pixels, ids, labels=None):
        """Training forward over a batch with one image per sequence.

        pixels (B, 3, S, S); ids (B, T) with one IMAGE_TOKEN_INDEX each (right-padded); labels (B, T)
        with -100 where no loss applies. Returns logits (B, T + N - 1, vocab) and the labels spread to
        the same length (-100 on the N image positions), where N = image tokens per image.
        """
        image_embeds = self.encode_image(pixels)                          # (B, N, d)
        embeds = torch.stack([self.splice(row, image) for row, image in zip(ids, image_embeds)])
        logits = self.llm(embeds=embeds)
        if labels is None:
            return logits, None
        spread = []
        for row, lab in zip(ids, labels):                                 # the same splice, for labels
            at = int((row == IMAGE_TOKEN_INDEX).nonzero()[0])
            spread.append(torch.cat([lab[:at], lab.new_full((image_embeds.shape[1],), -100), lab[at + 1:]]))
        return logits, torch.stack(spread)

    @classmethod
    def from_pretrained(cls, folder, device="cpu", dtype=torch.float32, fold_batchnorm=True, fast=True):
        """(model, tokenizer, config dict) from a FastVLM folder; see the module docstring.

        The vision tower arrives in the official stored form (branches fused, ConvFFN BatchNorm kept).
        For inference the BatchNorm is folded too, then speedups.apply() swaps in the faster kernels
        (unless `fast=False`); train.py keeps the stored form and the plain modules (`fold_batchnorm=False`,
        which also leaves out the speed step: a model to train stays plain, whatever `fast` says).
        """
        folder = Path(folder)
        if folder.is_file():
            raise CheckpointError(f"{folder} is a file, not a model folder; point at the folder that holds it")
        if not folder.is_dir():
            raise CheckpointError(f"model folder not found: {folder}")
        config = read_config(folder)
        vision_cfg = vision_config(config)
        llm_cfg = qwen2.Qwen2Config.from_dict(config)
        tokenizer = load_tokenizer(folder)
        if config.get("mm_hidden_size", vision_cfg.out_channels) != vision_cfg.out_channels:
            raise CheckpointError(f"config.json: mm_hidden_size {config['mm_hidden_size']} does not match the "
                                  f"vision tower's {vision_cfg.out_channels} channels")
        names = safetensors_names(folder)
        if not any(name.startswith(VISION_PREFIX) for name in names):
            raise CheckpointError(f"no vision-tower tensors under '{VISION_PREFIX}': not a FastVLM checkpoint")
        untied = "lm_head.weight" in names                  # tied unless the file has a head of its own
        llm_cfg = qwen2.Qwen2Config(**{**llm_cfg.__dict__, "tie_word_embeddings": not untied})
        with torch.device("meta"):                          # shapes only, no memory: filled below
            model = allocate(cls(vision_cfg, llm_cfg), dtype)
        # One tensor at a time from the files into the parameters: no second copy of the model.
        stream = ((ours, t) for name, t in iter_safetensors(folder, dtype)
                  if (ours := our_name(name, vision_cfg)) is not None)
        load_exact(model, stream, where=part_of, file_names=file_names(model))
        model = model.to(device).eval()
        if fold_batchnorm:
            model.vision_tower.reparameterize()             # the ConvFFN BatchNorms fold into their convs
            if fast:
                speedups.apply(model)
        return model, tokenizer, config


# ----------------------------------------------------------------------------------------------------
# Reading model folders: config.json, official tensor names, the tokenizer files.
# ----------------------------------------------------------------------------------------------------

def read_config(folder):
    """config.json of a model folder, the one place it is read."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} has no config.json; point at a model folder")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); re-download it") from None


def vision_config(config):
    """The FastViTHD config named by config.json: `mobileclip_l_<size>` is the release at <size> px.

    Folders written by train.py for small models add a `fastvithd` entry with the full config.
    """
    if "fastvithd" in config:
        try:
            return repmixer.FastViTHDConfig.from_dict(config["fastvithd"])
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"config.json: the 'fastvithd' entry is not a valid config ({e})") from None
    tower = config.get("mm_vision_tower", "")
    if not tower.startswith("mobileclip_l_"):
        raise CheckpointError(f"config.json: vision tower {tower!r} is not supported (expected mobileclip_l_<size>)")
    projector = config.get("mm_projector_type", "mlp2x_gelu")
    if projector != "mlp2x_gelu":
        raise CheckpointError(f"config.json: projector {projector!r} is not supported (expected mlp2x_gelu)")
    return repmixer.FastViTHDConfig(image_size=int(tower.rsplit("_", 1)[1]))


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


def _rename(key, to_ours):
    for official, ours in _RENAMES:
        src, dst = (official, ours) if to_ours else (ours, official)
        if src.startswith("^"):
            if key.startswith(src[1:]):
                key = dst[1:] + key[len(src) - 1:]
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


def is_official_form(encoder):
    """Every branch merged except the ConvFFN BatchNorm: the layout of Apple's stored checkpoints."""
    blocks = [m for m in encoder.modules() if isinstance(m, repmixer.Reparameterizable)]
    return all(m.is_fused != isinstance(m, repmixer.ConvFFN) for m in blocks)


def load_official(encoder, tensors, prefix=VISION_PREFIX):
    """Load official vision-tower tensors (full checkpoint names) into a fused-form FastViTHD.

    Only keys under `prefix` are considered; `head.*` is dropped by name; everything else must map
    onto a parameter or buffer with the same shape, and every parameter and buffer must be filled.
    """
    if not is_official_form(encoder):
        raise ValueError("official checkpoints are stored fused with the ConvFFN BatchNorm kept: "
                         "load into FastViTHD(cfg, fused=True) before calling reparameterize()")
    file_names = {name: prefix + to_official_key(name, encoder.cfg) for name in encoder.state_dict()}
    ours = {}
    for name, value in tensors.items():
        if not name.startswith(prefix):
            continue
        mapped = official_key(name[len(prefix):], encoder.cfg)
        if mapped is not None:
            ours[mapped], file_names[mapped] = value, name
    if not ours:
        raise CheckpointError(f"no vision-tower tensors under '{prefix}': not a FastVLM checkpoint")
    load_exact(encoder, ours, where="vision tower", file_names=file_names)
    return encoder


def allocate(model, dtype=None, device="cpu"):
    """A model built on the meta device -> the same model on `device` in `dtype`, its tensors allocated
    but not initialised (every one is filled by the loader). What to_empty() cannot keep is restored:
    a tied head's one tensor (to_empty makes two) and the computed RoPE tables."""
    model = model.to(dtype).to_empty(device=device) if dtype is not None else model.to_empty(device=device)
    for m in model.modules():
        if isinstance(m, qwen2.Qwen2):
            if m.cfg.tie_word_embeddings:
                m.lm_head.weight = m.embed_tokens.weight
            m.build_rope(4096, device)
    return model


def our_name(file_name, cfg):
    """Our FastVLM parameter name for a tensor name in an official file; None for the unused CLIP head."""
    if file_name.startswith(VISION_PREFIX):
        key = official_key(file_name[len(VISION_PREFIX):], cfg)
        return None if key is None else "vision_tower." + key
    if file_name.startswith(PROJECTOR_PREFIX):
        return "mm_projector." + file_name[len(PROJECTOR_PREFIX):]
    return "llm." + file_name.removeprefix("model.")         # model.layers.0... and lm_head.weight


def file_names(model):
    """The inverse of our_name for every tensor of `model`: what an error message calls it in the file."""
    out = {}
    for name in model.state_dict():
        part, key = name.split(".", 1)
        if part == "vision_tower":
            out[name] = VISION_PREFIX + to_official_key(key, model.vision_tower.cfg)
        elif part == "mm_projector":
            out[name] = PROJECTOR_PREFIX + key
        else:
            out[name] = key if key.startswith("lm_head.") else "model." + key
    return out


def part_of(name):
    """Which part of FastVLM one of our names belongs to, for error messages."""
    return {"vision_tower": "vision tower", "mm_projector": "projector"}.get(name.split(".", 1)[0], "language model")


def load_llm(cfg, tensors, dtype=None, device="cpu"):
    """Build a Qwen2 for `cfg` and fill it from HF-named tensors (`model.layers.0...`, `lm_head.weight`).

    The head is tied when the file has no `lm_head.weight`, whatever config.json says (Apple notes that
    some exported checkpoints' flag disagrees with their files).
    """
    untied = "lm_head.weight" in tensors
    cfg = qwen2.Qwen2Config(**{**cfg.__dict__, "tie_word_embeddings": not untied})
    with torch.device("meta"):                              # no time spent on a random init
        model = allocate(qwen2.Qwen2(cfg), dtype, device)
    ours = {name.removeprefix("model."): value for name, value in tensors.items()}
    file_names = {name: name if name.startswith("lm_head.") else "model." + name for name in model.state_dict()}
    load_exact(model, ours, where="language model",
               file_names={**file_names, **{name.removeprefix("model."): name for name in tensors}})
    return model.eval()


def load_qwen2(folder, dtype=None, device="cpu"):
    """An HF-format Qwen2 folder (config.json + model.safetensors, or shards with an index), e.g. the
    language model a new FastVLM starts from (train.py --init-llm)."""
    return load_llm(qwen2.Qwen2Config.from_dict(read_config(folder)), read_safetensors(folder, dtype=dtype),
                    dtype, device)


TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "added_tokens.json", "special_tokens_map.json",
                   "tokenizer_config.json")


def load_tokenizer(folder):
    """Qwen2's tokenizer from a model folder: `tokenizer.json`, or the slow tokenizer's `vocab.json` +
    `merges.txt` (+ `added_tokens.json`) that the official LLaVA checkpoints ship."""
    folder = Path(folder)
    try:
        if (folder / "tokenizer.json").is_file():
            tokenizer = qwen2.Tokenizer.from_json((folder / "tokenizer.json").read_text(encoding="utf-8"))
        elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
            merges = []
            for line in (folder / "merges.txt").read_text(encoding="utf-8").splitlines():
                line = line.rstrip("\r")               # some copies ship CRLF line endings
                if line and not line.startswith("#version"):
                    merges.append(tuple(line.split(" ")))
            specials = dict(qwen2.SPECIAL_TOKENS)
            if (folder / "added_tokens.json").is_file():
                specials.update(json.loads((folder / "added_tokens.json").read_text(encoding="utf-8")))
            tokenizer = qwen2.Tokenizer.from_vocab(vocab, merges, specials)
        else:
            raise CheckpointError(f"{folder} has no tokenizer (tokenizer.json, or vocab.json + merges.txt)")
    except CheckpointError:
        raise
    except qwen2.TokenizerMismatch as e:
        raise CheckpointError(f"{folder}: {e}: not the Qwen2 tokenizer this model needs") from None
    except Exception as e:  # json and the tokenizers library raise their own types for damaged files
        raise CheckpointError(f"{folder}: the tokenizer files are not readable ({e}); re-download them") from None
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


# ----------------------------------------------------------------------------------------------------
# A conversation about one image, reusing the KV cache across turns.
# ----------------------------------------------------------------------------------------------------

def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@dataclass
class Timing:
    """Seconds spent in each part of a turn. `start(device)`, then `lap(part)` after each part: the time
    since the previous lap goes to that part (after waiting for the device to finish its queued work)."""
    preprocess: float = 0.0
    encoder: float = 0.0
    projector: float = 0.0
    prefill: float = 0.0
    prompt_tokens: int = 0
    decode: float = 0.0
    new_tokens: int = 0
    _device: torch.device = field(default=None, repr=False)
    _last: float = field(default=0.0, repr=False)

    def start(self, device):
        self._device, self._last = device, time.perf_counter()

    def lap(self, part):
        if self._device is None:
            raise ValueError("Timing.lap() before Timing.start(device)")
        synchronize(self._device)
        now = time.perf_counter()
        setattr(self, part, getattr(self, part) + now - self._last)
        self._last = now

    @property
    def ttft(self):
        return self.preprocess + self.encoder + self.projector + self.prefill


class Chat:
    """Questions about one image. The image is encoded once; every turn's tokens stay in the KV cache,
    so a follow-up question only prefills its own few tokens (`reuse_cache=False` recomputes the whole
    conversation each turn instead, as a stateless implementation would)."""

    def __init__(self, model, tokenizer, image, config=None, reuse_cache=True):
        self.model, self.tokenizer, self.image = model, tokenizer, image
        self.reuse_cache = reuse_cache
        config = config or {}
        self.context = min(config.get("tokenizer_model_max_length", 8192), model.llm.cfg.max_position_embeddings)
        self.stop_ids = {tokenizer.token_id(t) for t in STOP_TOKENS if tokenizer.token_id(t) is not None}
        self.history = []             # every id fed so far, IMAGE_TOKEN_INDEX for the image
        self.image_embeds = None
        self.pos = 0                  # next free cache position
        self.timing = Timing()

    @torch.no_grad()
    def ask(self, question, max_new_tokens=256, temperature=0.0, top_p=1.0, seed=None, on_token=None):
        if not question or not question.strip():
            raise InputError("the question is empty; ask something about the image")
        model, device, t = self.model, self.model.llm.device, Timing()
        if self.image_embeds is None:
            t.start(device)
            pixels = preprocess(self.image, model.image_size)[None].to(device, model.llm.dtype)
            t.lap("preprocess")
            self.image_embeds = model.encode_image(pixels, timing=t)   # (1, N, d)
        ids = turn_ids(self.tokenizer, question, first=not self.history)
        needed = len(self.history) + len(ids) + self.image_embeds.shape[1] - 1   # <image> becomes 256 tokens
        if needed + max_new_tokens > self.context:
            raise InputError(f"the conversation needs {needed} + {max_new_tokens} tokens but the model's context "
                             f"is {self.context}; ask a shorter question, lower --max-new-tokens or start over")
        if model.llm.max_len < needed + max_new_tokens:    # grow (keeping what is cached) in big steps
            model.llm.setup_cache(min(self.context, max(2 * (needed + max_new_tokens), 1024)))
        if self.reuse_cache:
            feed, start_pos = ids, self.pos
        else:
            feed, start_pos = self.history + ids, 0
        self.history += ids
        embeds = model.embed(feed, self.image_embeds if IMAGE_TOKEN_INDEX in feed else None)
        t.prompt_tokens = embeds.shape[1]
        clock = {"start": time.perf_counter(), "first": None}

        def stream(token):
            if clock["first"] is None:
                synchronize(device)
                clock["first"] = time.perf_counter()
            if on_token is not None:
                on_token(token)

        out, self.pos = qwen2.generate(
            model.llm, embeds=embeds, start=start_pos, max_new_tokens=max_new_tokens, temperature=temperature,
            top_p=top_p, seed=seed, stop_ids=self.stop_ids, on_token=stream, vocab_limit=len(self.tokenizer))
        synchronize(device)
        end = time.perf_counter()
        self.history += out
        first_at = clock["first"] or end
        t.prefill = first_at - clock["start"]
        t.decode, t.new_tokens = end - first_at, len(out)
        self.timing = t
        return self.tokenizer.decode(out).strip()


def answer(model, tokenizer, image_path, question, **kw):
    """One question about one image file -> answer text (the three-line API: load, ask, answer)."""
    return Chat(model, tokenizer, load_image(image_path)).ask(question, **kw)
