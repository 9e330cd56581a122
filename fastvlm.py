"""FastVLM end to end (paper Sec. 3, Fig. 2): image -> FastViTHD -> MLP projector -> Qwen2 -> answer.

    image file --preprocess--> (1, 3, 1024, 1024) in [0, 1]
      --FastViTHD (repmixer.py)--> (1, 3072, 16, 16) --flatten--> (1, 256, 3072) visual tokens
      --projector: Linear(3072, d), GELU, Linear(d, d)--> (1, 256, d)
    prompt "<|im_start|>system ... user\n<image>\n{question}<|im_end|>\n<|im_start|>assistant\n"
      --tokenize, embed; the 256 projected tokens replace <image>--> (1, T + 256, d)
      --Qwen2 (qwen2.py): prefill, then one token at a time through the KV cache--> answer

Time to first token (TTFT), the paper's headline metric, is preprocessing + encoder + projector +
prefill: everything before the first decode step. `Chat` records each part.

`FastVLM.from_pretrained(folder)` reads a model folder in either layout it is published in (Apple's
LLaVA-Qwen2 layout: the `llava-fastvithd_*` zips, the `apple/FastVLM-*` repos and train.py's output;
transformers' `fast_vlm` layout), or a Hugging Face repo id from the local cache, with every tensor
consumed and every parameter filled. All reading and naming of model folders lives in this file: the
config, one table of tensor names per layout (`LLAVA`, `FAST_VLM`), the tokenizer files. For CPU
inference it then applies speedups.py's one step, which swaps modules for faster kernels without
changing a parameter (`fast=False` keeps the plain model).
"""

import json
import math
import os
import re
import shutil
import time
import unicodedata
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image, ImageOps
from tqdm import tqdm

import qwen2
import repmixer
import speedups
from checkpoint import CheckpointError, iter_safetensors, load_exact, read_safetensors, safetensors_headers

# The `qwen_2` conversation template of Apple's llava/conversation.py.
SYSTEM_PROMPT = "You are a helpful assistant."
SYSTEM = "<|im_start|>system\n" + SYSTEM_PROMPT + "<|im_end|>\n"
USER, ASSISTANT, END = "<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>\n"
START = "<|im_start|>"
IMAGE = "<image>"
IMAGE_TOKEN_INDEX = -200          # the placeholder id of <image> in input_ids (llava/constants.py)
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")
VISION_PREFIX = "model.vision_tower.vision_tower.model."   # Apple's MobileCLIP wrapper around FastViTHD
PROJECTOR_PREFIX = "model.mm_projector."


class InputError(ValueError):
    """Bad user input (image, question, options); the message says what is wrong and what to do."""


class AnswerError(ValueError):
    """No answer can be trusted (the logits went NaN or infinite); the message names the likely cause."""


# ----------------------------------------------------------------------------------------------------
# Preprocessing: exactly the official `image_aspect_ratio: pad` pipeline.
# ----------------------------------------------------------------------------------------------------

def load_image(path):
    """Open an image file as 8-bit RGB, upright according to its EXIF orientation.

    EXIF orientation is a deliberate difference from Apple's code (which ignores it, so phone photos
    can arrive sideways). 16-bit images are scaled to 8 bits (PIL's own conversion would clip them), and
    floating-point ones in [0, 1] from that range (PIL's would make them black).
    """
    if not str(path):
        raise InputError("the image path is empty; pass an image file")
    path = Path(path)
    try:
        if path.is_dir():
            raise InputError(f"{path} is a folder, not an image; pass an image file (use --batch for many)")
        if path.exists() and not path.is_file():
            raise InputError(f"{path} is not a regular file (a pipe, a device or a socket); save the image to a file")
        if not path.is_file():
            raise InputError(f"image not found: {path}")
    except OSError as e:                                 # a folder on the way that cannot be entered
        raise InputError(f"cannot reach {path} ({e.strerror}); check its folder's permissions") from None
    try:
        with warnings.catch_warnings():                 # large but allowed: PIL would warn on stderr
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()                               # decode now, so a truncated file fails here
                img = ImageOps.exif_transpose(img)
    except PermissionError:
        raise InputError(f"{path} is not readable (permission denied); check the file's permissions") from None
    except Image.DecompressionBombError as e:
        raise InputError(f"{path} is too large to decode safely ({e}); resize it first") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"{path} is not a readable image ({e}); pass a PNG, JPEG or similar") from None
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # high bit depth grayscale
        a = np.nan_to_num(np.asarray(img, dtype=np.float64))
        if img.mode == "F" and a.max() <= 1.0:            # floating-point images usually hold [0, 1]
            top = 1.0
        else:
            top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


# The padded square of a very elongated image is far larger than the image (1 x 40000 pixels pads to
# 40000 x 40000, 4.8 GB). Up to this many pixels, or twice the image's own, the square is built as the
# official pipeline builds it (bit-exact); beyond, the image is first shrunk by a whole factor with a box
# filter so that its square fits. Real photos (any ratio up to 2:1, any ratio up to 4096 px) never get there.
EXACT_SQUARE_PIXELS = 4096 * 4096


def expand_to_square(img, fill=(0, 0, 0)):
    """Pad to a square with the background colour, image centred (odd pixel right/bottom); see
    EXACT_SQUARE_PIXELS for the memory bound on extreme aspect ratios."""
    w, h = img.size
    if w == h:
        return img
    bound = max(EXACT_SQUARE_PIXELS, 2 * w * h)
    if max(w, h) ** 2 > bound:
        img = img.reduce(math.ceil(max(w, h) / math.isqrt(bound)))
        w, h = img.size
    side = max(w, h)
    canvas = Image.new(img.mode, (side, side), fill)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def square_rgb(img, size):
    """The 8-bit half of the pipeline: pad to square with black (the background is mean * 255 and
    MobileCLIP's mean is 0), resize with PIL bicubic. RGB PIL image -> (size, size, 3) uint8 tensor."""
    img = expand_to_square(img).resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.array(img))


# k / 255 for every 8-bit k, divided on the CPU: numpy's correctly rounded float32 values (tests check all
# 256). A GPU gets them by table lookup, because torch's CUDA kernel for `x / 255.0` multiplies by a
# rounded 1/255 instead (a scalar divisor becomes its reciprocal: aten/src/ATen/native/cuda/
# BinaryDivTrueKernel.cu), one unit off in the last place for 126 of the 256 values.
PIXEL_VALUES = torch.arange(256, dtype=torch.float32).div_(255.0)
_pixel_tables = {}


def to_pixels(rgb, device="cpu", dtype=torch.float32):
    """(S, S, 3) uint8 -> (1, 3, S, S) on `device`: k / 255 in float32 as Apple's pipeline computes it
    (then mean 0 / std 1, which leaves the values as they are), cast to `dtype`. The 8-bit values travel
    to a GPU, a quarter of the float copy, and are looked up there in PIXEL_VALUES."""
    device = torch.device(device)
    x = rgb.to(device).permute(2, 0, 1)[None]                          # (1, 3, S, S) uint8
    if device.type == "cpu":
        return x.float().div_(255.0).contiguous().to(dtype)           # a true division here: see the tests
    key = (str(device), dtype)
    if key not in _pixel_tables:
        _pixel_tables[key] = PIXEL_VALUES.to(device, dtype)
    return _pixel_tables[key][x.long()].contiguous()


def preprocess(img, size):
    """RGB PIL image -> (3, size, size) float32 in [0, 1], exactly as Apple's pipeline computes it."""
    return to_pixels(square_rgb(img, size))[0]


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


def turn_ids(tokenizer, question, first, system=SYSTEM_PROMPT):
    """Token ids of one user turn (the first with the system prompt and the image placeholder).

    User text is only text: the question (and a system prompt of the user's) is encoded with special-
    token strings taken literally, so a typed `<|im_end|>` cannot close the turn, and an `<image>` typed
    in it is the characters it is; the placeholder goes only where the template puts it. Special tokens
    split a text into pieces that are tokenized separately, so encoding the template's pieces apart from
    the pieces that hold user text gives, for any ordinary question, exactly the ids of
    `tokenize_with_image(tokenizer, first_turn(question))` (or of `next_turn(question)` for a follow-up).
    """
    if first:   # pieces: <|im_start|> "system\n{system}" <|im_end|> "\n" <|im_start|> "user\n" <image> "\n{question}"
        head = (tokenizer.encode(START) + tokenizer.encode_text("system\n" + system) + tokenizer.encode(END + USER)
                + [IMAGE_TOKEN_INDEX] + tokenizer.encode_text("\n" + question))
    else:       # pieces: <|im_end|> "\n" <|im_start|> "user\n{question}"
        head = tokenizer.encode(END + START) + tokenizer.encode_text("user\n" + question)
    return head + tokenizer.encode(END + ASSISTANT)


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
        """Training forward over a batch of conversations, each with one image or none (text-only).

        pixels (K, 3, S, S): the images of the rows of `ids` that hold an IMAGE_TOKEN_INDEX, in row order
        (None when no row does); ids (B, T) right-padded; labels (B, T) with -100 where no loss applies.
        Returns logits (B, T', vocab) and the labels spread to the same positions: -100 on the N image
        tokens, and on the zeros that pad a text-only row to the others' length T' (causal attention
        never lets an earlier position see them).
        """
        has_image = (ids == IMAGE_TOKEN_INDEX).any(1).tolist()
        if sum(has_image) != (0 if pixels is None else len(pixels)):
            raise ValueError(f"{sum(has_image)} rows hold an image marker but {0 if pixels is None else len(pixels)} "
                             "images were given")
        images = iter(self.encode_image(pixels) if pixels is not None else ())     # (K, N, d)
        rows, spread = [], []
        for b, row in enumerate(ids):
            image = next(images) if has_image[b] else None
            rows.append(self.splice(row, image))                              # (T or T + N - 1, d)
            if labels is not None:
                lab = labels[b]
                if image is not None:                                         # the same splice, for labels
                    at = int((row == IMAGE_TOKEN_INDEX).nonzero()[0])
                    lab = torch.cat([lab[:at], lab.new_full((image.shape[0],), -100), lab[at + 1:]])
                spread.append(lab)
        width = max(r.shape[0] for r in rows)
        embeds = torch.stack([nn.functional.pad(r, (0, 0, 0, width - r.shape[0])) for r in rows])   # (B, T', d)
        logits = self.llm(embeds=embeds)
        if labels is None:
            return logits, None
        return logits, torch.stack([nn.functional.pad(l, (0, width - l.shape[0]), value=-100) for l in spread])

    @classmethod
    def from_pretrained(cls, folder, device="cpu", dtype=torch.float32, fold_batchnorm=True, fast=True,
                        progress=False):
        """(model, tokenizer, config dict) from a FastVLM folder in any supported layout, or a Hugging Face
        repo id (`apple/FastVLM-0.5B`) found in the local cache (see resolve_model); `progress` shows a bar
        while the tensors load. See the module docstring.

        The vision tower arrives in the official stored form (branches fused, ConvFFN BatchNorm kept).
        For inference the BatchNorm is folded too, then speedups.apply() swaps in the faster kernels
        (unless `fast=False`); train.py keeps the stored form and the plain modules (`fold_batchnorm=False`,
        which also leaves out the speed step: a model to train stays plain, whatever `fast` says).
        """
        folder = resolve_model(folder)
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
            model = cls(vision_cfg, llm_cfg)
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
        model.eval()                                        # already on `device`: allocated there
        if fold_batchnorm:
            model.vision_tower.reparameterize()             # the ConvFFN BatchNorms fold into their convs
            if fast:
                speedups.apply(model)
        return model, tokenizer, config


# ----------------------------------------------------------------------------------------------------
# Reading model folders: config.json, official tensor names, the tokenizer files.
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
                   "for (from_pretrained's dtype, infer.py's --dtype)",
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


def check_tokenizer(folder, tokenizer, llm_cfg, config):
    """The tokenizer must belong to the model: no more tokens than embedding rows, and the `<image>` id
    of a config that names one (transformers' `image_token_index`) must be the tokenizer's."""
    if len(tokenizer) > llm_cfg.vocab_size:
        raise CheckpointError(f"{folder}: the tokenizer has {len(tokenizer):,} tokens but the model's embedding "
                              f"{llm_cfg.vocab_size:,} rows: they are not from the same model")
    index = config.get("image_token_index")
    if index is not None and index != tokenizer.token_id(IMAGE):
        raise CheckpointError(f"{folder}: config.json's image_token_index is {index!r} but the tokenizer's {IMAGE} "
                              f"token is {tokenizer.token_id(IMAGE)!r}: they are not from the same model")


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
    but not initialised (every one is filled by the loader). What to_empty() cannot keep is restored:
    a tied head's one tensor (to_empty makes two) and the computed RoPE tables."""
    model = model.to(dtype).to_empty(device=device) if dtype is not None else model.to_empty(device=device)
    for m in model.modules():
        if isinstance(m, qwen2.Qwen2):
            if m.cfg.tie_word_embeddings:
                m.lm_head.weight = m.embed_tokens.weight
            m.build_rope(4096, device)
    return model


# ----------------------------------------------------------------------------------------------------
# Checkpoint layouts: the same tensors under each publisher's names.
# ----------------------------------------------------------------------------------------------------

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


def timm_key(key, cfg=None):
    """Our vision-tower name for a timm `fastvit_mci3` key, e.g. `stages.3.pos_emb.reparam_conv.weight`
    -> `stages.3.cpe.fused.weight` (`cfg` is unused: timm's names already follow the stages)."""
    return _rename(key, to_ours=True, rules=_TIMM_RENAMES)


def to_timm_key(key, cfg=None):
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
                  "model.language_model.", timm_key, to_timm_key)


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
    language model a new FastVLM starts from (train.py --init-llm). As in from_pretrained, the stored
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


# NFC, which Qwen2's tokenizer applies first, can shorten UTF-8 text at most 3 times: a character whose
# canonical decomposition has three code points (U+0390, a Hangul syllable's three jamo) composes from 6
# or 9 bytes into 2 or 3 (tests check every code point).
NFC_MAX_SHRINK = 3


def longest_token_bytes(tokenizer):
    """The most bytes of UTF-8 text that one token of `tokenizer` can stand for (computed once, kept on
    it). A byte-level BPE (Qwen2's) spells each byte as one character of its 256-character alphabet;
    any other token (an added one, such as `<image>`) counts its text's UTF-8 length."""
    longest = getattr(tokenizer, "longest_token_bytes", None)
    if longest is None:
        from tokenizers import pre_tokenizers

        alphabet = set(pre_tokenizers.ByteLevel.alphabet())
        added = {t.content for t in tokenizer.tok.get_added_tokens_decoder().values()}
        longest = max(len(token) if token not in added and alphabet.issuperset(token) else len(token.encode("utf-8"))
                      for token in tokenizer.tok.get_vocab(with_added_tokens=True))
        tokenizer.longest_token_bytes = longest
    return longest


class Chat:
    """Questions about one image. The image is encoded once; every turn's tokens stay in the KV cache,
    so a follow-up question only prefills its own few tokens (`reuse_cache=False` recomputes the whole
    conversation each turn instead, as a stateless implementation would)."""

    def __init__(self, model, tokenizer, image, config=None, reuse_cache=True, system=SYSTEM_PROMPT):
        self.model, self.tokenizer, self.image, self.system = model, tokenizer, image, system
        self.reuse_cache = reuse_cache
        config = config or {}
        self.context = min(config.get("tokenizer_model_max_length", 8192), model.llm.cfg.max_position_embeddings)
        self.stop_ids = {tokenizer.token_id(t) for t in STOP_TOKENS if tokenizer.token_id(t) is not None}
        # Answers use the tokenizer's ids (embedding rows past it are padding), less an `<image>` token at
        # its end: transformers' layout adds one for its placeholder, which no answer contains.
        image_id = tokenizer.token_id(IMAGE)
        self.vocab_limit = image_id if image_id is not None and image_id == len(tokenizer) - 1 else len(tokenizer)
        self.history = []             # every id fed so far, IMAGE_TOKEN_INDEX for the image
        self.image_embeds = None
        self.pos = 0                  # next free cache position
        self.timing = Timing()

    def check_question(self, question):
        """Refuse a question that is empty, not text, or too long for what is left of the context, the
        last from its UTF-8 length alone, before anything is tokenized: tokenizing takes about 100 bytes of
        memory per byte of text, so a 20 MB question would peak at gigabytes before its token count could
        refuse it. A token stands for at most `longest_token_bytes` bytes of the NFC-normalised text, so a
        text of more bytes than that times the tokens left needs more tokens than are left; a question
        that could fit is never refused here (the token count decides, in reserve)."""
        if not question or question.isspace():
            raise InputError("the question is empty; ask something about the image")
        size = 0
        for text, what in ((question, "the question"), (self.system, "the system prompt")):
            try:
                length = len(text) if text.isascii() else len(text.encode("utf-8"))   # ASCII: no copy
            except UnicodeEncodeError:   # undecodable bytes (from a terminal or argv) arrive as surrogates
                raise InputError(f"{what} is not valid UTF-8 text; check your terminal's encoding") from None
            if text is question or not self.history:      # the system prompt is in the first turn only
                size += length
        left = self.context - len(self.history)
        limit = left * longest_token_bytes(self.tokenizer)
        texts = (question,) if self.history else (self.system, question)
        if limit < size <= NFC_MAX_SHRINK * limit and not all(text.isascii() for text in texts):
            # NFC may shorten the text (ASCII it leaves alone); short enough here to measure exactly
            size = sum(len(unicodedata.normalize("NFC", text).encode("utf-8")) for text in texts)
        if size > limit:
            what = "the question" + ("" if self.history else " with the system prompt")
            raise InputError(f"{what} is {size:,} bytes: more than the {left:,} tokens left in the model's "
                             f"context can hold (a token stands for at most {longest_token_bytes(self.tokenizer)} "
                             "bytes); ask a shorter question or start over")

    def reserve(self, question, max_new_tokens):
        """The ids of the next turn; the KV cache grown (keeping what it holds) to fit it and its answer."""
        self.check_question(question)
        ids = turn_ids(self.tokenizer, question, first=not self.history, system=self.system)
        # the one <image> id (in this turn or in the history) stands for all the image's tokens
        needed = len(self.history) + len(ids) + self.model.vision_tower.cfg.num_tokens() - 1
        if needed + max_new_tokens > self.context:
            raise InputError(f"the conversation needs {needed} + {max_new_tokens} tokens but the model's context "
                             f"is {self.context}; ask a shorter question, lower --max-new-tokens or start over")
        llm = self.model.llm
        if llm.max_len < needed + max_new_tokens:          # grow in big steps, whole multiples of 64
            llm.setup_cache(min(self.context, max(-(-2 * (needed + max_new_tokens) // 64) * 64, 1024)))
        return ids

    @torch.no_grad()
    def warm_up(self, question, max_new_tokens=256, temperature=0.0, top_p=1.0):
        """Pay a device's one-time costs on a turn that is then forgotten, so that the next ask() is timed
        in the steady state: on CUDA the first call of each kernel loads it and picks its algorithm (seconds
        for the encoder), and the first prefill and decode steps record their graphs
        (speedups.GraphedQwen2). The cache is sized for `question` and `max_new_tokens` first, as ask()
        will need it, so nothing is reallocated (and recorded again) after; with the same sampling
        options, so that their kernels are loaded too. Returns the seconds it took; the chat is as it was."""
        start = time.perf_counter()
        saved = list(self.history), self.pos, self.image_embeds, self.stop_ids, self.timing
        self.reserve(question, max_new_tokens)
        self.stop_ids = set()                              # at least one decode step, whatever is sampled
        try:
            self.ask(question, max_new_tokens=2, temperature=temperature, top_p=top_p)
        finally:
            self.history, self.pos, self.image_embeds, self.stop_ids, self.timing = saved
        synchronize(self.model.llm.device)
        return time.perf_counter() - start

    @torch.no_grad()
    def ask(self, question, max_new_tokens=256, temperature=0.0, top_p=1.0, seed=None, on_token=None):
        self.check_question(question)                      # before the image is encoded, too
        model, device, t = self.model, self.model.llm.device, Timing()
        t.start(device)
        if self.image_embeds is None:
            pixels = to_pixels(square_rgb(self.image, model.image_size), device, model.llm.dtype)
            t.lap("preprocess")
            self.image_embeds = model.encode_image(pixels, timing=t)   # (1, N, d)
        ids = self.reserve(question, max_new_tokens)
        if self.reuse_cache:
            feed, start_pos = ids, self.pos
        else:
            feed, start_pos = self.history + ids, 0
        self.history += ids
        embeds = model.embed(feed, self.image_embeds if IMAGE_TOKEN_INDEX in feed else None)
        t.prompt_tokens = embeds.shape[1]
        clock = {"start": t._last, "first": None}   # the prefill's share: from the image's last lap, so
        #                                           that tokenizing and embedding the turn count too

        def stream(token):
            if clock["first"] is None:
                synchronize(device)
                clock["first"] = time.perf_counter()
            if on_token is not None:
                on_token(token)

        try:
            out, self.pos = qwen2.generate(
                model.llm, embeds=embeds, start=start_pos, max_new_tokens=max_new_tokens, temperature=temperature,
                top_p=top_p, seed=seed, stop_ids=self.stop_ids, on_token=stream, vocab_limit=self.vocab_limit)
        except qwen2.NonFiniteLogits as e:
            del self.history[len(self.history) - len(ids):]        # the turn was not taken
            raise AnswerError(non_finite_cause(model, str(e))) from None
        synchronize(device)
        end = time.perf_counter()
        self.history += out
        first_at = clock["first"] or end
        t.prefill = first_at - clock["start"]
        t.decode, t.new_tokens = end - first_at, len(out)
        self.timing = t
        return self.tokenizer.decode(out).strip()


def non_finite_cause(model, what):
    """What to tell a user whose model produced NaN/inf: damaged weights if the loader saw any, else an
    overflow of the dtype."""
    bad = getattr(model, "nonfinite_tensor", None)
    if bad is not None:
        return f"{what}: the checkpoint holds NaN or infinite weights (first: '{bad}'); re-download or re-train it"
    dtype = str(model.llm.dtype).removeprefix("torch.")
    return (f"{what}: the activations overflowed {dtype}; run in bfloat16 or float32 "
            "(--dtype bfloat16, or --dtype float32)")


def answer(model, tokenizer, image_path, question, **kw):
    """One question about one image file -> answer text (the three-line API: load, ask, answer)."""
    return Chat(model, tokenizer, load_image(image_path)).ask(question, **kw)
