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
or one written by train.py, with every tensor consumed and every parameter filled.
"""

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image, ImageOps

import onednn
import repmixer
import qwen2
from checkpoint import CheckpointError, load_exact, read_safetensors

# The `qwen_2` conversation template of Apple's llava/conversation.py.
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
USER, ASSISTANT, END = "<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>\n"
IMAGE = "<image>"
IMAGE_TOKEN_INDEX = -200          # the placeholder id of <image> in input_ids (llava/constants.py)
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")
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
    """Token ids of `text`, each <image> replaced by IMAGE_TOKEN_INDEX (pieces tokenized separately)."""
    ids = []
    for i, piece in enumerate(text.split(IMAGE)):
        if i:
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(tokenizer.encode(piece))
    return ids


# ----------------------------------------------------------------------------------------------------
# The model.
# ----------------------------------------------------------------------------------------------------

class FastVLM(nn.Module):
    def __init__(self, vision_cfg=repmixer.FASTVITHD, llm_cfg=qwen2.QWEN2_0_5B, fused=True):
        super().__init__()
        self.vision_tower = repmixer.FastViTHD(vision_cfg, fused=fused)
        d = llm_cfg.hidden_size
        # `mlp2x_gelu`: two linear layers with a GELU between (LLaVA-1.5's connector)
        self.mm_projector = nn.Sequential(onednn.Linear(vision_cfg.out_channels, d), nn.GELU(), onednn.Linear(d, d))
        self.llm = qwen2.Qwen2(llm_cfg)

    @property
    def image_size(self):
        return self.vision_tower.cfg.image_size

    def encode_image(self, pixels):
        """(B, 3, S, S) -> (B, (S/64)^2, d): visual tokens in the LLM's embedding space."""
        return self.mm_projector(repmixer.to_tokens(self.vision_tower(channels_last(pixels))))

    def embed(self, ids, image_embeds=None):
        """(T,) ids with IMAGE_TOKEN_INDEX placeholders -> (1, T', d) embeddings with the image spliced in."""
        ids = torch.as_tensor(ids, device=self.llm.device)
        pieces, begin = [], 0
        image_positions = (ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist()
        if len(image_positions) > (0 if image_embeds is None else 1):
            raise ValueError("one image per conversation: the prompt has more <image> markers than images")
        for p in image_positions:
            pieces += [self.llm.embed_tokens(ids[begin:p]), image_embeds[0]]
            begin = p + 1
        pieces.append(self.llm.embed_tokens(ids[begin:]))
        return torch.cat(pieces, dim=0)[None]

    def forward(self, pixels, ids, labels=None):
        """Training forward over a batch with one image per sequence.

        pixels (B, 3, S, S); ids (B, T) with one IMAGE_TOKEN_INDEX each (right-padded); labels (B, T)
        with -100 where no loss applies. Returns logits (B, T + N - 1, vocab) and the labels spread to
        the same length (-100 on the N image positions), where N = image tokens per image.
        """
        image_embeds = self.encode_image(pixels)                          # (B, N, d)
        embeds, spread = [], []
        for b in range(ids.shape[0]):
            at = int((ids[b] == IMAGE_TOKEN_INDEX).nonzero()[0])
            e = self.llm.embed_tokens(ids[b].clamp(min=0))                # placeholder embedded, then cut
            embeds.append(torch.cat([e[:at], image_embeds[b], e[at + 1:]]))
            if labels is not None:
                hole = labels.new_full((image_embeds.shape[1],), -100)
                spread.append(torch.cat([labels[b, :at], hole, labels[b, at + 1:]]))
        logits = self.llm(embeds=torch.stack(embeds))
        return logits, (torch.stack(spread) if labels is not None else None)

    @classmethod
    def from_pretrained(cls, folder, device="cpu", dtype=torch.float32, fold_batchnorm=True):
        """(model, tokenizer, config dict) from a FastVLM folder; see the module docstring.

        The vision tower arrives in the official stored form (branches fused, ConvFFN BatchNorm kept);
        for inference the BatchNorm is folded too, train.py keeps it (`fold_batchnorm=False`).
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(f"model folder not found: {folder}")
        config = qwen2.read_config(folder)
        vision_cfg = vision_config(config)
        llm_cfg = qwen2.Qwen2Config.from_dict(config)
        tokenizer = qwen2.Tokenizer(folder)
        tensors = read_safetensors(folder, dtype=dtype)
        vision = {k: v for k, v in tensors.items() if k.startswith(repmixer.OFFICIAL_PREFIX)}
        projector = {k[len(PROJECTOR_PREFIX):]: v for k, v in tensors.items() if k.startswith(PROJECTOR_PREFIX)}
        llm = {k: v for k, v in tensors.items() if k not in vision and not k.startswith(PROJECTOR_PREFIX)}
        if config.get("mm_hidden_size", vision_cfg.out_channels) != vision_cfg.out_channels:
            raise CheckpointError(f"config.json: mm_hidden_size {config['mm_hidden_size']} does not match the "
                                  f"vision tower's {vision_cfg.out_channels} channels")
        with torch.device("meta"):                          # shapes only; every tensor is filled below
            model = cls(vision_cfg, llm_cfg)
        model.vision_tower = model.vision_tower.to_empty(device="cpu").to(dtype)
        repmixer.load_official(model.vision_tower, vision)
        if fold_batchnorm:                                 # fold the ConvFFN BatchNorms, channels-last
            model.vision_tower.optimize_for_inference()
        model.mm_projector = model.mm_projector.to_empty(device="cpu").to(dtype)
        load_exact(model.mm_projector, projector, where="projector")
        model.llm = qwen2.load_llm(llm_cfg, llm, dtype=dtype)
        return model.to(device).eval(), tokenizer, config


def channels_last(pixels):
    """Images in the memory layout of the inference encoder (see FastViTHD.optimize_for_inference)."""
    return pixels.contiguous(memory_format=torch.channels_last)


def vision_config(config):
    """The FastViTHD config named by config.json: `mobileclip_l_<size>` is the release at <size> px.

    Folders written by train.py for small models add a `fastvithd` entry with the full config.
    """
    if "fastvithd" in config:
        c = config["fastvithd"]
        return repmixer.FastViTHDConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in c.items()})
    tower = config.get("mm_vision_tower", "")
    if not tower.startswith("mobileclip_l_"):
        raise CheckpointError(f"config.json: vision tower {tower!r} is not supported (expected mobileclip_l_<size>)")
    projector = config.get("mm_projector_type", "mlp2x_gelu")
    if projector != "mlp2x_gelu":
        raise CheckpointError(f"config.json: projector {projector!r} is not supported (expected mlp2x_gelu)")
    return repmixer.FastViTHDConfig(image_size=int(tower.rsplit("_", 1)[1]))


# ----------------------------------------------------------------------------------------------------
# A conversation about one image, reusing the KV cache across turns.
# ----------------------------------------------------------------------------------------------------

@dataclass
class Timing:
    preprocess: float = 0.0
    encoder: float = 0.0
    projector: float = 0.0
    prefill: float = 0.0
    prompt_tokens: int = 0
    decode: float = 0.0
    new_tokens: int = 0

    @property
    def ttft(self):
        return self.preprocess + self.encoder + self.projector + self.prefill


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


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
            start = time.perf_counter()
            pixels = preprocess(self.image, model.image_size)[None].to(device, model.llm.dtype)
            synchronize(device)
            t.preprocess = time.perf_counter() - start
            start = time.perf_counter()
            features = repmixer.to_tokens(model.vision_tower(channels_last(pixels)))
            synchronize(device)
            t.encoder = time.perf_counter() - start
            start = time.perf_counter()
            self.image_embeds = model.mm_projector(features)
            synchronize(device)
            t.projector = time.perf_counter() - start
        ids = tokenize_with_image(self.tokenizer, next_turn(question) if self.history else first_turn(question))
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
