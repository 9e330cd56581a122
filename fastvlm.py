"""FastVLM end to end (paper Sec. 3, Fig. 2): image -> FastViTHD -> MLP projector -> Qwen2 -> answer.

    image --preprocess--> (1, 3, 1024, 1024) in [0, 1]
      --FastViTHD (repmixer.py)--> (1, 3072, 16, 16) --flatten--> (1, 256, 3072) visual tokens
      --projector: Linear(3072, d), GELU, Linear(d, d)--> (1, 256, d)
    prompt "<|im_start|>system ... user\n<image>\n{question}<|im_end|>\n<|im_start|>assistant\n"
      --tokenize, embed; the 256 projected tokens replace <image>--> (1, T + 256, d)
      --Qwen2 (qwen2.py): prefill, then one token at a time through the KV cache--> answer

Time to first token (TTFT), the paper's headline metric (Sec. 4, Fig. 1), is preprocessing + encoder +
projector + prefill: everything before the first decode step. FastViTHD's job is to make the middle two
small: a 1024 px image becomes only 256 tokens, where a ViT-L/14 would make 5,329 (about 21x as many).

This file is the model and what it needs to read a prompt: the official preprocessing (bit-exact), the
`qwen_2` prompt template (one renderer, for a chat's turns and for training's labels), the projector,
and the splice of image tokens into the prompt; and, for fine-tuning a released model, the low-rank
adapter (LoRA) that LLaVA-1.5's recipe trains instead of the decoder's weights. Reading checkpoint
folders, chat state and timing live in support/ (support/loading.py builds this model from a folder;
support/chat.py asks it questions; support/adapters.py puts adapters in and reads and writes their files).
"""

import math

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

import qwen2
import repmixer

# The `qwen_2` conversation template of Apple's llava/conversation.py.
SYSTEM_PROMPT = "You are a helpful assistant."
START, END = "<|im_start|>", "<|im_end|>\n"
USER, ASSISTANT = START + "user\n", START + "assistant\n"
IMAGE = "<image>"
IMAGE_TOKEN_INDEX = -200          # the placeholder id of <image> in input_ids (llava/constants.py)
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


# ----------------------------------------------------------------------------------------------------
# Preprocessing: exactly the official `image_aspect_ratio: pad` pipeline.
# ----------------------------------------------------------------------------------------------------

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


def to_pixels(rgb):
    """(S, S, 3) uint8 -> (1, 3, S, S) float32: k / 255 as Apple's pipeline computes it, a true division
    (numpy's correctly rounded values; then mean 0 / std 1, which leaves the values as they are).
    support/speedups.py's `to_pixels` gives the same values on a GPU, where `x / 255` is not exact."""
    return rgb.permute(2, 0, 1)[None].float().div_(255.0).contiguous()


def preprocess(img, size):
    """RGB PIL image -> (3, size, size) float32 in [0, 1], exactly as Apple's pipeline computes it."""
    return to_pixels(square_rgb(img, size))[0]


# ----------------------------------------------------------------------------------------------------
# The prompt.
# ----------------------------------------------------------------------------------------------------

def turn_ids(tokenizer, question, first, system=SYSTEM_PROMPT, image=True):
    """Token ids of one user turn, up to the assistant's header; the first turn opens with the system
    prompt and (unless `image` is False: a text-only conversation) holds the image's placeholder
    (IMAGE_TOKEN_INDEX) before the question, as LLaVA places it.

    User text is only text: the question (and a system prompt of the user's) is encoded with special-
    token strings taken literally, so a typed `<|im_end|>` cannot close the turn, and an `<image>` typed
    in it is the characters it is; the placeholder goes only where the template puts it. Special tokens
    split a text into pieces that are tokenized separately, so encoding the template's pieces apart from
    the user's gives, for any ordinary question, exactly the ids of the template's text as one string.
    """
    ids = []
    if first:       # pieces: <|im_start|> "system\n{system}" <|im_end|> "\n"
        ids += tokenizer.encode(START) + tokenizer.encode_text("system\n" + system) + tokenizer.encode(END)
    if first and image:     # <|im_start|> "user\n" <image> "\n{question}"
        ids += tokenizer.encode(USER) + [IMAGE_TOKEN_INDEX] + tokenizer.encode_text("\n" + question)
    else:                   # <|im_start|> "user\n{question}"
        ids += tokenizer.encode(START) + tokenizer.encode_text("user\n" + question)
    return ids + tokenizer.encode(END + ASSISTANT)     # <|im_end|> "\n" <|im_start|> "assistant\n"


def conversation_ids(tokenizer, exchanges, system=SYSTEM_PROMPT, image=True):
    """The ids and labels of a whole conversation, [(question, answer or None), ...], for training: the
    same turns as a chat feeds (turn_ids), each answer followed by `<|im_end|>\n`. Labels are -100 (no
    loss) except on each answer and its `<|im_end|>`: the model learns to answer and to stop, never to
    write the template or the user's turn (LLaVA's `preprocess_qwen_2` masks the same tokens). Data text
    is only text, as a user's is: a `<|im_end|>` written in a record is its characters, not a control
    token (LLaVA's tokenizer call would take it as one, and the row would end there)."""
    ids, labels = [], []
    end = tokenizer.encode(END)                                        # <|im_end|> "\n"
    for i, (question, answer) in enumerate(exchanges):
        turn = turn_ids(tokenizer, question, first=i == 0, system=system, image=image)
        ids += turn
        labels += [-100] * len(turn)
        if answer is not None:
            text = tokenizer.encode_text(answer)
            ids += text + end
            labels += text + end[:1] + [-100] * (len(end) - 1)         # learnt: the answer and <|im_end|>
    return ids, labels


# ----------------------------------------------------------------------------------------------------
# The model.
# ----------------------------------------------------------------------------------------------------

class FastVLM(nn.Module):
    """Fig. 2 as three modules, named as Apple's checkpoints name them: `vision_tower` (FastViTHD, image ->
    visual tokens), `mm_projector` (visual tokens -> the LLM's embedding width) and `llm` (Qwen2)."""

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

        Inference and training both encode here; `timing` (support/chat.py's Timing) records the encoder
        and the projector.
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


# ----------------------------------------------------------------------------------------------------
# Fine-tuning with low-rank adapters (LoRA: Hu et al., ICLR 2022), as LLaVA-1.5 fine-tunes with them
# (scripts/v1_5/finetune_lora.sh: r 128, alpha 256, dropout 0.05, on every linear layer of the LLM).
# ----------------------------------------------------------------------------------------------------

class LoRALinear(nn.Module):
    """A frozen linear layer W (out, in) plus a learnt update of rank r:

        y = W x + b + (alpha / r) * B A dropout(x)          A: (r, in), B: (out, r), r << in, out

    Full fine-tuning learns all in * out weights of W (and AdamW keeps two moments of each); LoRA learns
    r * (in + out): for Qwen2-0.5B's q_proj (896 -> 896) at r = 128, 229,376 instead of 802,816, and for
    all seven projections of its 24 layers 70.4 M instead of 358 M. A starts random and B at zero, so the
    update B A is zero and training starts from exactly the base model; alpha / r keeps the update's scale
    the same whatever r is. After training, B A folds into W (`merged`): no extra cost at inference.
    The names (`base_layer`, `lora_A`, `lora_B`) are PEFT's, so that adapter files keep its key names.
    """

    def __init__(self, base, r, alpha, dropout=0.0):
        super().__init__()
        if not 0 < r <= min(base.in_features, base.out_features):
            raise ValueError(f"rank {r} is not between 1 and the layer's smaller side, "
                             f"{min(base.in_features, base.out_features)}")
        self.base_layer, self.r, self.alpha, self.scaling = base, r, alpha, alpha / r
        self.lora_dropout = nn.Dropout(dropout)
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=base.weight.device)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=base.weight.device)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))   # nn.Linear's own init, as PEFT's
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):                                          # (..., in) -> (..., out)
        update = self.lora_B(self.lora_A(self.lora_dropout(x)))    # (..., in) -> (..., r) -> (..., out)
        return self.base_layer(x) + self.scaling * update

    @torch.no_grad()
    def merged(self):
        """The plain nn.Linear with W + (alpha / r) B A: the same function in eval mode (no dropout)."""
        base = self.base_layer
        delta = self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())   # (out, r) @ (r, in)
        layer = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                          device=base.weight.device, dtype=base.weight.dtype)
        layer.weight.copy_(base.weight.float() + delta)
        if base.bias is not None:
            layer.bias.copy_(base.bias)
        return layer
