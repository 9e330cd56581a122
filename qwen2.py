"""Qwen2, the language half of FastVLM (paper Sec. 3, "LLM decoder"), by hand.

A stock decoder-only transformer; every piece of a modern LLM in one file:

    token ids (B, T) -> embed_tokens -> (B, T, d)       [or input embeddings, so images can be spliced in]
    N x DecoderLayer:
        x = x + Attention(RMSNorm(x))   grouped-query attention, RoPE on q and k, q/k/v biases, KV cache
        x = x + MLP(RMSNorm(x))         SwiGLU: down(silu(gate(x)) * up(x))
    RMSNorm -> lm_head (tied to embed_tokens for 0.5B and 1.5B) -> logits (B, T, vocab)

The KV cache (gpt-fast style) is allocated once for the maximum length and written in place. Prefill
pushes the whole prompt through once and fills positions [0, T); each decode step computes one new
token's q/k/v, writes its k/v at position T, T+1, ... and attends to everything cached so far. Without
a cache, generating n tokens would recompute the whole prefix at every step (quadratic work); with it,
each step costs one token's worth of matmuls plus reading the cache.

Also here: generation (greedy, temperature, top-p, as transformers samples). The tokenizer (Qwen2's
byte-level BPE, from the `tokenizers` library) is support/tokenizer.py; reading checkpoint folders is
support/loading.py's job; faster kernels live in support/speedups.py, which swaps modules of a loaded model.
"""

from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------------
# Configuration: the three official sizes; any HF Qwen2 config.json reads into the same dataclass.
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Qwen2Config:
    """The sizes of a Qwen2 decoder. Every field is read: the first six shape the weights,
    `rms_norm_eps` goes inside each RMSNorm's square root, `rope_theta` is RoPE's base (Qwen2: 1e6, not
    Llama's 10000), `max_position_embeddings` bounds the KV cache (setup_cache), `tie_word_embeddings`
    makes the head share the embedding's tensor. head_dim is hidden_size / num_attention_heads."""

    vocab_size: int = 151936
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2          # grouped-query attention: 7 query heads share one k/v head
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = True

    # config.json is user input. Each whole-number field's upper bound, far beyond any released Qwen2 (7B:
    # 28 layers, width 3584, 152,064 tokens): a config past one is damaged, and building its model would
    # exhaust the memory before any tensor could disagree with it. Floats must be positive and finite.
    LIMITS = {"vocab_size": 2**22, "hidden_size": 2**16, "intermediate_size": 2**18, "num_hidden_layers": 1024,
              "num_attention_heads": 1024, "num_key_value_heads": 1024, "max_position_embeddings": 2**22}

    def __post_init__(self):
        for f in fields(self):              # "896" or 0 must not get further
            value, kind = getattr(self, f.name), type(f.default)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)   # True is an int
            whole = number and isinstance(value, int)
            if kind is bool:
                ok, wanted = isinstance(value, bool), "true or false"
            elif kind is float:
                ok, wanted = number and 0 < value < float("inf"), "a positive finite number"
            else:
                top = self.LIMITS[f.name]
                ok, wanted = whole and 0 < value <= top, f"a whole number from 1 to {top:,}"
            if not ok:
                raise ValueError(f"{f.name} must be {wanted}, not {value!r}")
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must split into {self.num_attention_heads} heads, "
                             f"and those into {self.num_key_value_heads} k/v groups")

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d):
        """The Qwen2 fields of an HF (or LLaVA-Qwen2) config.json.

        Keys that would make transformers' Qwen2 compute something this decoder does not are refused
        (ValueError): an activation other than SiLU (`hidden_act`), scaled RoPE (`rope_scaling` /
        `rope_parameters` of a type other than "default"), sliding-window attention (`use_sliding_window`,
        or a `layer_types` entry other than "full_attention"), a `head_dim` other than hidden_size /
        num_attention_heads. Every other key is ignored: ids and names (`bos_token_id`, `eos_token_id`,
        `architectures`, `model_type`), settings of training or storage (`attention_dropout`,
        `initializer_range`, `torch_dtype`, `use_cache`), `sliding_window` and `max_window_layers` (read
        only with sliding windows on), and the `mm_*` / tokenizer keys, which support/loading.py reads.
        """
        unsupported = cls.unsupported(d)
        if unsupported:
            raise ValueError(unsupported)
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in names}
        if "rope_theta" not in values and "rope_theta" in (d.get("rope_parameters") or {}):
            values["rope_theta"] = d["rope_parameters"]["rope_theta"]   # newer transformers nest it
        return cls(**values)

    @staticmethod
    def unsupported(d):
        """What in config dict `d` this decoder would compute differently from transformers' Qwen2, or None."""
        if d.get("hidden_act", "silu") != "silu":
            return f"hidden_act {d['hidden_act']!r} is not supported: Qwen2's MLP here is SiLU-gated ('silu')"
        for key in ("rope_scaling", "rope_parameters"):        # older transformers: rope_scaling (or null)
            rope = d.get(key)
            kind = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else rope
            if kind not in (None, "default"):
                return f"{key} {rope!r} is not supported: only plain RoPE (rope_type 'default') is implemented"
        layer_types = d.get("layer_types") or []
        if d.get("use_sliding_window") or any(t != "full_attention" for t in layer_types):
            return "sliding-window attention (use_sliding_window, layer_types) is not supported: every layer here " \
                   "attends to the whole context, as in Qwen2's releases"
        heads, width = d.get("num_attention_heads"), d.get("hidden_size")
        if d.get("head_dim") is not None and isinstance(heads, int) and isinstance(width, int) and heads > 0 \
                and d["head_dim"] != width // heads:
            return f"head_dim {d['head_dim']!r} is not supported: it must be hidden_size / num_attention_heads " \
                   f"({width // heads})"
        return None


QWEN2_0_5B = Qwen2Config()
QWEN2_1_5B = Qwen2Config(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2)
QWEN2_7B = Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False)


# ----------------------------------------------------------------------------------------------------
# The blocks.
# ----------------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, with the statistics in float32 even for bf16/fp16 models."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_tables(head_dim, max_len, theta, device=None, dtype=torch.float32):
    """cos/sin of position * frequency, (max_len, head_dim), both halves repeated (rotate-half layout).

    Frequency i is theta^(-2i/d): the first pairs of dimensions turn fast with position, the last slowly.
    Computed in float32 like the reference implementation, whatever the model's dtype.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).to(dtype) / head_dim)
    angles = torch.arange(max_len, device=device).to(dtype)[:, None] * inv_freq[None, :]  # (L, d/2)
    angles = torch.cat([angles, angles], dim=-1)                                         # (L, d)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate each (x_i, x_{i+d/2}) pair by its angle. x: (B, H, T, d); cos/sin: (T, d).

    The pairing of dimension i with i + d/2 ("rotate half") is the convention the checkpoints were
    trained with. Because q.k after rotation depends on the angle difference only, attention scores
    depend on relative position.
    """
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class KVCache(nn.Module):
    """Keys and values of every position seen so far, preallocated: (B, kv_heads, max_len, head_dim)."""

    def __init__(self, batch, kv_heads, max_len, head_dim, dtype, device):
        super().__init__()
        shape = (batch, kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start, k, v):
        """Write (B, kv_heads, T, d) at [start, start+T) in place; return views of [0, start+T)."""
        end = start + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"sequence of {end} tokens exceeds the cache of {self.k.shape[2]}")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


def causal_mask(T, S, device=None):
    """Which keys each query may see, (T, S) bool, or None when there is one query.

    The T queries are the last T of the S positions whose keys attention sees (S = T without a cache,
    S = start + T with one), so query i sits at position S - T + i and sees keys 0 .. S - T + i: the
    lower triangle shifted right by S - T. A single new token (a decode step) sees every key.
    """
    if T == 1:
        return None
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=S - T)


class Attention(nn.Module):
    """Grouped-query self-attention: H query heads, H_kv key/value heads shared by H / H_kv queries each."""

    use_sdpa = True  # False runs the plain softmax(q k^T / sqrt(d) + mask) v below

    def __init__(self, cfg):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.heads * self.head_dim, cfg.hidden_size, bias=False)
        self.cache = None

    def forward(self, x, cos, sin, start):                        # x: (B, T, d)
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)       # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)    # (B, H_kv, T, hd)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.cache is not None:
            k, v = self.cache.update(start, k, v)                 # (B, H_kv, start+T, hd)
        S = k.shape[2]
        if self.use_sdpa:
            # With S == T the mask is the plain causal triangle, which SDPA builds itself (and skips).
            triangle = T > 1 and S == T
            mask = None if triangle else causal_mask(T, S, x.device)  # (T, S), or None for one new token
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=triangle, enable_gqa=True)
        else:
            mask = causal_mask(T, S, x.device)
            groups = self.heads // self.kv_heads
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, H, S, hd)
            scores = (q @ k.transpose(-2, -1)) / self.head_dim ** 0.5                     # (B, H, T, S)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            out = scores.softmax(-1) @ v                                                   # (B, H, T, hd)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU feed-forward: down( silu(gate(x)) * up(x) ), no biases."""

    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, start):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2(nn.Module):
    """The decoder. Module names follow HF's (minus the leading `model.`), so checkpoints load by name."""

    def __init__(self, cfg=QWEN2_0_5B):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight       # one tensor, two names
        self.max_len = 0
        self.build_rope(4096)

    def build_rope(self, length, device=None):
        """The RoPE cos/sin tables for positions 0 .. length-1 (computed, not stored in checkpoints)."""
        cos, sin = rope_tables(self.cfg.head_dim, length, self.cfg.rope_theta, device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self, std=0.02):
        """Fresh weights as Qwen2 is initialised (`initializer_range`): N(0, std) matrices and
        embeddings, zero biases, unit norm gains. PyTorch's defaults (N(0, 1) embeddings) would start a
        tied model with huge logits."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        return self

    @property
    def device(self):
        return self.embed_tokens.weight.device

    @property
    def dtype(self):
        return self.embed_tokens.weight.dtype

    def setup_cache(self, max_len, batch=1):
        """Allocate every layer's KV cache once, for sequences of up to max_len tokens.

        Called again with a larger max_len, it keeps what is already cached (a longer conversation).
        """
        if max_len > self.cfg.max_position_embeddings:
            raise ValueError(f"max_len {max_len} exceeds the model's context of {self.cfg.max_position_embeddings}")
        for layer in self.layers:
            old = layer.self_attn.cache
            new = KVCache(batch, self.cfg.num_key_value_heads, max_len, self.cfg.head_dim, self.dtype, self.device)
            if old is not None and old.k.shape[0] == batch:
                keep = min(old.k.shape[2], max_len)
                new.k[:, :, :keep], new.v[:, :, :keep] = old.k[:, :, :keep], old.v[:, :, :keep]
            layer.self_attn.cache = new
        self.max_len = max_len
        if self.rope_cos.shape[0] < max_len or self.rope_cos.device != self.device:
            self.build_rope(max(max_len, 4096), self.device)

    def drop_cache(self):
        for layer in self.layers:
            layer.self_attn.cache = None
        self.max_len = 0

    def forward(self, tokens=None, embeds=None, start=0, last_only=False):
        """Logits for the tokens (B, T) or embeddings (B, T, d) at positions start .. start+T-1.

        With a cache (setup_cache) the keys/values are written to it and attention covers every earlier
        position; without one the input is the whole sequence (training). `last_only` skips the
        vocabulary projection for all but the last position, which is all that prefill needs.
        """
        x = self.embed_tokens(tokens) if embeds is None else embeds
        T = x.shape[1]
        if start + T > self.rope_cos.shape[0]:
            self.build_rope(start + T, self.device)
        cos = self.rope_cos[start:start + T].to(x.dtype)
        sin = self.rope_sin[start:start + T].to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, start)
        x = self.norm(x)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(x)


# ----------------------------------------------------------------------------------------------------
# Generation.
# ----------------------------------------------------------------------------------------------------

def sample(logits, temperature=0.0, top_p=1.0, generator=None):
    """One token id from (vocab,) logits: argmax at temperature 0, else nucleus sampling.

    The draw is transformers' (the official FastVLM samples with its `generate`): softmax of the scores
    that `nucleus` leaves, then one torch.multinomial draw; given the same random stream it picks the
    same token."""
    if temperature < torch.finfo(torch.float32).tiny:     # 0, or so small it is 0 in float32: greedy
        return int(logits.argmax())
    probs = torch.softmax(nucleus(logits, temperature, top_p), dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def nucleus(logits, temperature, top_p):
    """The (vocab,) float32 scores a sample is drawn from: logits / temperature, and -inf for every token
    outside the top-p nucleus, as transformers' TemperatureLogitsWarper and TopPLogitsWarper
    (min_tokens_to_keep=1) leave them, computed the same way so that the same tokens are kept.

    The nucleus is the smallest set of most likely tokens whose probability reaches top_p. transformers
    finds it from the other end: in ascending order of probability, a token is dropped while the
    cumulative probability up to and including it is at most 1 - top_p. So a run of most likely tokens
    whose probabilities sum to exactly top_p is kept, and every token after it dropped (the sums are
    float32, the bound 1 - top_p is taken in float64 and compared in float32, as there). The most likely
    token is always kept, however small top_p is.
    """
    scores = logits.float() / temperature
    if scores.max().isinf():
        # A temperature so small that the logits overflow: shifted so the largest logit is 0, the others
        # go to -inf (greedy in the limit) instead of every probability turning NaN.
        scores = (logits.float() - logits.max()) / temperature
    if top_p < 1.0:
        sorted_scores, order = scores.sort()              # ascending, as transformers sorts
        sorted_probs = sorted_scores.softmax(-1)
        drop = sorted_probs.cumsum(-1) <= 1 - top_p
        drop[-1] = False                                  # the most likely token stays
        scores = scores.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return scores


class NonFiniteLogits(RuntimeError):
    """NaN or infinite logits: damaged weights, or values beyond the range of the model's dtype."""


@torch.no_grad()
def generate(model, tokens=None, embeds=None, start=0, max_new_tokens=64, temperature=0.0, top_p=1.0,
             seed=None, stop_ids=(), on_token=None, vocab_limit=None):
    """Prefill the prompt at `start`, then decode one token at a time through the KV cache.

    Returns (new token ids without the stop token, next free cache position). Every returned id has
    been written to the cache, so a follow-up turn can continue at that position. `on_token(id)` is
    called as soon as each token is chosen (streaming). `vocab_limit` ignores logits past the
    tokenizer's length (padding rows of the embedding), as the official loader does by resizing.
    Raises NonFiniteLogits when a step's logits hold NaN or infinity (no answer could be trusted); this
    forward writes each cache slot before it reads it, so a later turn never meets the failed one's. A +inf logit among
    finite ones is refused too, not taken as the surest token: it is an overflow of the dtype (the head's
    sum ran past float16's 65,504, say), whose true size, and its order among other infinite logits, is
    lost; sampling from it would be NaN (inf - inf), and greedy argmax a guess.
    """
    if model.max_len == 0:
        raise ValueError("call model.setup_cache(max_len) before generate()")
    generator = None
    if seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(seed)
    prompt = tokens if embeds is None else embeds
    T = prompt.shape[1]
    if start + T + max_new_tokens > model.max_len:
        raise ValueError(f"prompt ({start + T} tokens) plus {max_new_tokens} new tokens exceeds "
                         f"the cache of {model.max_len}")
    logits = model(tokens, embeds, start=start, last_only=True)[0, -1]
    pos, out = start + T, []
    for _ in range(max_new_tokens):
        logits = logits[:vocab_limit]
        if not torch.isfinite(logits).all():   # NaN or inf: no token can be chosen from these
            raise NonFiniteLogits(f"the model produced non-finite logits after {len(out)} new tokens")
        token = sample(logits, temperature, top_p, generator)
        if token in stop_ids:
            break
        out.append(token)
        if on_token is not None:
            on_token(token)
        logits = model(torch.tensor([[token]], device=model.device), start=pos)[0, -1]
        pos += 1
    return out, pos
