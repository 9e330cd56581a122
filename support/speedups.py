"""Every speed-up of the project, applied to a loaded model in one step: `speedups.apply(model)`.

The model files (repmixer.py, qwen2.py, fastvlm.py) are plain PyTorch, written as the paper reads.
This file makes them fast the way gpt-fast does: it swaps modules of a loaded model for subclasses
whose `forward` computes the same math with faster kernels. A swap changes a module's class and
nothing else, so the `state_dict()` (keys and values) is the same before and after, and the plain
model stays one `fast=False` away (support.loading.load_model) for reading, training and checking.
tests/test_speedups.py compares every swapped module with its plain self on the same weights, in the
inference form (float32, no autograd, where the fused kernels run) and in training (autograd on,
where every swapped module runs its plain forward). A swapped module whose activation is not the
exact GELU the kernels apply runs its plain forward too.

What is swapped, and why (measured numbers: docs/performance.md):

1. An activation after a conv is a second pass over a large map. The ConvFFN's expansion writes a
   (B, 4C, H, W) map that `F.gelu` then reads and writes again, and the exact (erf) GELU is costly
   per element. oneDNN applies it to each output tile while the tile is still in registers (a
   "post-op"): `conv_gelu`, used by the stem, downsampling and ConvFFN blocks.
2. A residual add after a conv is another pass; oneDNN adds the residual as a post-op too:
   `conv_scale_add`. `x + ls * conv(h)` needs the layer scale `ls` folded into the conv first:
   ls * (W h + b) = (ls W) h + ls b, a product over the (small) weight instead of the (large) output.
3. `F.linear` calls the BLAS, which on the CPUs measured ran Qwen2's shapes slower than oneDNN's own
   matmul: every nn.Linear becomes `FastLinear`. oneDNN's 1x1 conv is slow on a small map with many
   channels (stage 5 at 1024 px: 16 x 16 pixels, 6144 channels), where the same product as a matmul
   over the pixels is faster: up to SMALL_MAP_PIXELS pixels a 1x1 conv runs as one.
4. Channels-last: most of the encoder's time goes to 1x1 convs over large maps, which oneDNN runs as
   products over (pixels x channels); with each pixel's channels contiguous no layout conversion is
   needed around every conv, and the attention stages' flattening into tokens is a free view. The
   encoder's weights are stored channels-last and `ChannelsLastFastViTHD` converts its input.

torch exposes oneDNN's fused kernels as `torch.ops.mkldnn._convolution_pointwise` and
`_linear_pointwise`, the ops torch.compile's CPU backend emits. They are private and have no
autograd, so they run only when every condition of `fast_path()` holds: CPU tensors all in float32 or
all in bfloat16, no gradient being recorded, a build that has them, and `enabled` left True. Otherwise
each helper runs the plain expression written beside it. In bfloat16 oneDNN multiplies on the CPU's
bf16 units (AVX512-BF16, AMX) and accumulates in float32; `bf16_units()` tells whether a CPU has
them, and `--dtype auto` (support/options.py) runs in bfloat16 only where it does: elsewhere bf16 is
converted to float32 and back around every product, slower than float32 itself.

Decoding one token reads every weight of the language model once, so on a CPU its speed follows the
bytes of the weights (docs/performance.md measures it against a read-bandwidth probe):

7. `quantize_int8(model)` replaces the decoder's linear layers, and a copy of the tied output head, by
   `Int8Linear`: int8 weights with one scale per output row, a quarter of float32's bytes and half of
   bfloat16's, multiplied by torch's CPU kernel for weight-only int8 (`aten._weight_int8pack_mm`,
   gpt-fast's `WeightOnlyInt8Linear`). Unlike the swaps above it changes the weights: it is applied
   only when asked for (`--quantize int8`), and its answers differ from float32's (docs/performance.md
   publishes by how much).

On a CUDA GPU the arithmetic is already in cuBLAS and cuDNN; what costs is Python. One decode step of
the 0.5B decoder dispatches about 1,700 aten operations (views included; counted with a dispatch mode)
for one token, each with its Python and launch overhead, while the GPU's share of the step is one read
of the weights. So:

5. The one-token decode step is captured once as a CUDA graph and replayed for every new token
   (`GraphedQwen2`): one launch per token. A graph replays fixed kernels on fixed memory, so the step is
   rewritten with every shape fixed (`static_forward`): positions are tensors on the GPU, the new k/v
   are written into the cache with `index_copy_` at those positions, and attention reads all `max_len`
   cached slots with those past each position masked out. The prefill, launch-bound the same way, gets
   the same treatment: the prompt is padded to a multiple of PREFILL_BUCKET tokens and each padded
   length is recorded once. By hand with `torch.cuda.graph` rather than
   `torch.compile(mode="reduce-overhead")`: no compile time (the first answer of a CLI call would wait
   for it), no dependence on Triton, one short function to read; the price is no kernel fusion.
6. The encoder keeps the plain NCHW layout on CUDA (CPU_SWAPS, channels-last included, are CPU-only):
   tools/gpu_check.py times both layouts on the GPU at hand (docs/performance.md).
"""

import contextlib
import time
import warnings
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import fastvlm as FV
import qwen2
import repmixer

enabled = True

_OPS = torch.ops.mkldnn
HAVE_FUSED_OPS = (torch.backends.mkldnn.is_available()
                  and hasattr(_OPS, "_convolution_pointwise") and hasattr(_OPS, "_linear_pointwise"))

# Up to this many pixels a 1x1 conv runs as a matmul over the pixels (see 3. above): stage 5 at 1024 px
# has 256 pixels; at stage 4's 1024 pixels the conv kernel measured faster.
SMALL_MAP_PIXELS = 256


@contextmanager
def plain_ops():
    """Run the plain expressions inside this block, e.g. for torch's FlopCounterMode, which sees aten ops only."""
    global enabled
    before, enabled = enabled, False
    try:
        yield
    finally:
        enabled = before


@contextmanager
def flop_counter():
    """torch's FlopCounterMode over the plain ops, with CPU attention counted:

        with speedups.flop_counter() as counter:
            model(x)
        counter.get_total_flops()

    The counter sees aten ops only, hence the plain ops (the fused kernels compute the same products).
    torch 2.13's counter has formulas for the GPU attention kernels but not for the CPU one that
    `F.scaled_dot_product_attention` runs here, so it would count attention as 0 FLOPs (half of
    ViT-L/14's work at 1024 px). `_count_cpu_attention` fills that in.
    """
    from torch.utils.flop_counter import FlopCounterMode

    _count_cpu_attention()
    with plain_ops(), FlopCounterMode(display=False) as counter:
        yield counter


def _count_cpu_attention():
    """Register a FLOP formula for the CPU SDPA kernel, unless this torch already has one."""
    from torch.utils import flop_counter as fc

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None or op in fc.flop_registry:
        return

    @fc.register_flop_formula(op)
    def sdpa_cpu_flops(q_shape, k_shape, v_shape, dropout_p=0.0, is_causal=False, *args, **kwargs):
        # q k^T and (scores) v: 2 * B * H * T * S * (d + d_v), as torch counts the GPU kernels.
        flops = fc.sdpa_flop_count(q_shape, k_shape, v_shape)
        T, S = q_shape[-2], k_shape[-2]
        if is_causal and T == S:                                # only the lower triangle is computed
            flops = flops * (T + 1) // (2 * T)
        return flops


FAST_DTYPES = (torch.float32, torch.bfloat16)
# oneDNN's own test for bfloat16 kernels on this CPU (AVX-512 or newer; torch's mkldnn_linear refuses
# bfloat16 without it): elsewhere bfloat16 runs the plain ops
BF16_KERNELS = HAVE_FUSED_OPS and bool(getattr(_OPS, "_is_mkldnn_bf16_supported", lambda: False)())


def fast_path(*tensors):
    """True when oneDNN's fused kernels may replace the plain ops for these tensors: on the CPU, all in
    float32 or all in bfloat16 (the kernels take one dtype)."""
    given = [t for t in tensors if t is not None]
    return (enabled and HAVE_FUSED_OPS and not torch.is_grad_enabled() and bool(given)
            and given[0].dtype in FAST_DTYPES and (given[0].dtype == torch.float32 or BF16_KERNELS)
            and all(t.device.type == "cpu" and t.dtype == given[0].dtype for t in given))


def bf16_units(cpuinfo="/proc/cpuinfo"):
    """(whether this CPU multiplies bfloat16 in hardware, the reason in words), from the flags the
    kernel reports: x86's avx512_bf16 or amx_bf16, Arm's bf16. Where the flags cannot be read (not
    Linux), no: bfloat16 is then asked for by name (--dtype bfloat16), not assumed."""
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as f:
            flags = set()
            for line in f:
                if line.split(":")[0].strip() in ("flags", "Features"):
                    flags.update(line.split(":", 1)[1].split())
                    break
    except OSError:
        return False, f"{cpuinfo} cannot be read, so the CPU's bf16 units are unknown"
    found = [name for name in BF16_FLAGS if name in flags]
    if found:
        return True, f"the CPU has bf16 matmul units ({', '.join(found)})"
    return False, f"the CPU has no bf16 matmul units (none of {', '.join(BF16_FLAGS)} in {cpuinfo})"


BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")     # /proc/cpuinfo names: x86 AMX, x86 AVX-512, Arm


# ----------------------------------------------------------------------------------------------------
# Kernels: each computes the plain expression in its docstring, which it runs itself off the fast path.
# ----------------------------------------------------------------------------------------------------

def linear_gelu(x, linear):
    """GELU(linear(x)) with the GELU applied inside the matmul (1. above).          (..., in) -> (..., out)"""
    if fast_path(x, linear.weight, linear.bias) and x.is_contiguous():
        return _OPS._linear_pointwise(x, linear.weight, linear.bias, "gelu", [], "none")
    return F.gelu(F.linear(x, linear.weight, linear.bias))


def _conv_fast_path(x, conv, *more):
    """fast_path() for a conv, which oneDNN's fused op takes with numeric zero padding only."""
    return (fast_path(x, conv.weight, conv.bias, *more)
            and conv.padding_mode == "zeros" and not isinstance(conv.padding, str))


def _conv_args(conv):
    return list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups


def _as_matmul(x, conv):
    """A 1x1 conv on a channels-last map is a matmul over its pixels; True when that is the faster kernel."""
    return (conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.groups == 1
            and x.shape[-2] * x.shape[-1] <= SMALL_MAP_PIXELS
            and x.is_contiguous(memory_format=torch.channels_last))


def _pixels(x):
    """(B, C, H, W) channels-last -> (B, H, W, C), a free view whose last dim is the channels."""
    return x.permute(0, 2, 3, 1)


def conv_gelu(x, conv):
    """GELU(conv(x)) with the GELU applied inside the conv (1. above).    (B, C, H, W) -> (B, C', H', W')"""
    if not _conv_fast_path(x, conv):
        return F.gelu(conv(x))
    if _as_matmul(x, conv):
        w = conv.weight.flatten(1)                              # (C', C, 1, 1) -> (C', C)
        return _OPS._linear_pointwise(_pixels(x), w, conv.bias, "gelu", [], "none").permute(0, 3, 1, 2)
    return _OPS._convolution_pointwise(x, conv.weight, conv.bias, *_conv_args(conv), "gelu", [], "none")


def conv_scale_add(h, conv, scale, residual):
    """residual + scale * conv(h), one pass (2. above). scale: (C', 1, 1) per-channel layer scale."""
    if not _conv_fast_path(h, conv, scale, residual):
        return residual + scale * conv(h)
    w = conv.weight * scale.reshape(-1, 1, 1, 1)                # fold ls into the weight: (C', C, k, k)
    b = None if conv.bias is None else conv.bias * scale.flatten()
    if _as_matmul(h, conv) and residual.is_contiguous(memory_format=torch.channels_last):
        out = _OPS._linear_pointwise.binary(_pixels(h), _pixels(residual), w.flatten(1), b, "add")
        return out.permute(0, 3, 1, 2)                          # (B, H, W, C') -> channels-last (B, C', H, W)
    return _OPS._convolution_pointwise.binary(h, residual, w, b, *_conv_args(conv), "add", None, None, [], None)


def is_exact_gelu(act):
    """The fused kernels apply the exact (erf) GELU: only a module whose activation is that may use them."""
    return type(act) is nn.GELU and act.approximate == "none"


def convffn_residual(ffn, x, scale):
    """x + scale * ffn(x) for a repmixer.ConvFFN, with its GELU and the residual add fused (1., 2.)."""
    if not is_exact_gelu(ffn.act):
        return x + scale * ffn(x)
    h = ffn.fused(x) if ffn.is_fused else ffn.local(x)          # (B, C, H, W), 7x7 depthwise
    h = conv_gelu(h, ffn.fc1)                                   # (B, 4C, H, W) = GELU(fc1(h))
    return conv_scale_add(h, ffn.fc2, scale, x)                 # (B, C, H, W) = x + scale * fc2(h)


# ----------------------------------------------------------------------------------------------------
# The swapped modules: each a subclass of a plain one, with the same parameters.
# ----------------------------------------------------------------------------------------------------

def linear(x, weight, bias=None):
    """F.linear(x, weight, bias) on oneDNN's matmul (3. above).                     (..., in) -> (..., out)"""
    if fast_path(x, weight, bias) and x.is_contiguous():
        return _OPS._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class FastLinear(nn.Linear):
    """nn.Linear whose CPU inference runs oneDNN's matmul (3.)."""

    def forward(self, x):                                       # (..., in) -> (..., out)
        return linear(x, self.weight, self.bias)


class FastMobileOneBlock(repmixer.MobileOneBlock):
    """A fused block without squeeze-excite runs GELU(conv(x)) as one oneDNN conv (1.)."""

    def forward(self, x):
        if self.is_fused and isinstance(self.se, nn.Identity) and is_exact_gelu(self.act):
            return conv_gelu(x, self.fused)
        return super().forward(x)


class FastLargeKernelConv(repmixer.LargeKernelConv):
    """The fused downsampling conv and its GELU as one oneDNN conv (1.)."""

    def forward(self, x):
        return conv_gelu(x, self.fused) if self.is_fused and is_exact_gelu(self.act) else super().forward(x)


class FastRepMixerBlock(repmixer.RepMixerBlock):
    """Y = RepMixer(X); Z = Y + ls * ConvFFN(Y), with the FFN's GELU and the residual add fused (1., 2.)."""

    def forward(self, x):
        y = self.token_mixer(x)
        return convffn_residual(self.convffn, y, self.layer_scale)


class FastAttentionBlock(repmixer.AttentionBlock):
    """Y = X + ls1 * MHSA(LN(X)) in one addcmul; Z = Y + ls2 * ConvFFN(Y) with GELU and add fused (1., 2.)."""

    def forward(self, x):
        y = torch.addcmul(x, self.layer_scale_1, self.token_mixer(self.norm(x)))
        return convffn_residual(self.convffn, y, self.layer_scale_2)


class ChannelsLastFastViTHD(repmixer.FastViTHD):
    """The encoder with its input converted to channels-last, the layout its weights are stored in (4.)."""

    def forward(self, images, return_stages=False):
        return super().forward(images.contiguous(memory_format=torch.channels_last), return_stages)


# plain class -> its fast subclass; a module is swapped only when its class is exactly the plain one
CPU_SWAPS = {
    nn.Linear: FastLinear,
    repmixer.MobileOneBlock: FastMobileOneBlock,
    repmixer.LargeKernelConv: FastLargeKernelConv,
    repmixer.RepMixerBlock: FastRepMixerBlock,
    repmixer.AttentionBlock: FastAttentionBlock,
    repmixer.FastViTHD: ChannelsLastFastViTHD,
}


# ----------------------------------------------------------------------------------------------------
# int8 weights for decoding (7.)
# ----------------------------------------------------------------------------------------------------

_INT8_MM = getattr(torch.ops.aten, "_weight_int8pack_mm", None)

# Up to this many rows (tokens) the int8 kernel multiplies directly: a decode step has one. A prompt
# has hundreds, where the kernel (which converts the weights tile by tile for every row block) ran at
# about half of a bfloat16 matmul: there the weight is converted to bfloat16 once and multiplied by
# oneDNN (measured on a 2-core AMD EPYC, 2026-12-04: equal at 16 rows, 19 vs 10 ms at 300).
INT8_MM_ROWS = 16


class Int8Linear(nn.Module):
    """A linear layer with int8 weights and one float scale per output row (weight-only quantization):

        W[o, i] ~ scales[o] * q[o, i],  q in [-127, 127],  scales[o] = max_i |W[o, i]| / 127
        y = x W^T + b = (x q^T) * scales + b                              (..., in) -> (..., out)

    Symmetric (no zero point): every weight is off by at most half a step, scales[o] / 2. The scale is
    rounded to bfloat16 first and q computed against the rounded scale, so that rounding costs no more
    than that. A decode step (up to INT8_MM_ROWS rows, no autograd) runs torch's int8 kernel with
    bfloat16 activations and float32 accumulation (its only fast form on the CPU: with float32
    activations it measured 30x slower); more rows, or autograd, multiply the weights converted to the
    dtype of x. The result is in the dtype of x; the bias stays in that dtype too.
    """

    def __init__(self, weight, bias=None):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight", torch.empty(weight.shape, dtype=torch.int8, device=weight.device))
        self.register_buffer("scales", torch.empty(weight.shape[0], dtype=torch.bfloat16, device=weight.device))
        for start in range(0, weight.shape[0], 8192):                 # in slices: the head has 151,936 rows
            rows = slice(start, start + 8192)
            w = weight[rows].detach().float()                         # (rows, in)
            scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-30).to(torch.bfloat16)
            q = torch.round(w / scale.float()[:, None]).clamp_(-127, 127)
            self.weight[rows] = q.to(torch.int8)
            self.scales[rows] = scale
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x):                                              # (..., in) -> (..., out)
        h = x.reshape(-1, self.in_features)                            # (rows, in)
        if (_INT8_MM is not None and h.device.type == "cpu" and h.shape[0] <= INT8_MM_ROWS
                and not torch.is_grad_enabled()):                      # (the kernel has no backward)
            y = _INT8_MM(h.to(torch.bfloat16).contiguous(), self.weight, self.scales.to(torch.bfloat16))
        else:                                                          # x (s * q)^T = (x q^T) * s
            y = linear(h.contiguous(), self.weight.to(h.dtype)) * self.scales.to(h.dtype)
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights"


def quantize_int8(model):
    """Every nn.Linear of every Qwen2 decoder in `model` (attention, MLP and output head) -> Int8Linear,
    in place; returns the model. The embedding table stays in the run's dtype (a lookup reads one row
    per token). A head tied to it gets its own int8 copy: the head reads all of it for every token,
    the embedding one row. The projector and the vision encoder stay as they are: they run once per
    image, bound by compute, not by reading weights."""
    for llm in [m for m in model.modules() if isinstance(m, qwen2.Qwen2)]:
        # (parent, name) pairs, not the layers themselves: each float layer is freed as soon as it is
        # replaced, so that loading peaks at the float model plus one layer, not plus the int8 copy
        places = [(parent, name) for parent in llm.modules() for name, child in parent.named_children()
                   if isinstance(child, nn.Linear)]
        for parent, name in places:
            child = getattr(parent, name)
            setattr(parent, name, Int8Linear(child.weight, child.bias))
    return model


# ----------------------------------------------------------------------------------------------------
# CUDA: the decode step and the prefill as graphs (5.)
# ----------------------------------------------------------------------------------------------------

def static_attention(attn, x, cos, sin, positions, mask, real=None):
    """qwen2.Attention for T tokens at given positions, with every shape fixed.   x: (B, T, d) -> (B, T, d)

    positions (T,) int64; mask (g*T, S) or (1, S): 0 where a query may see a cache slot, -inf elsewhere;
    real (T, 1) bool, for a padded prompt: its real rows (the padding's k/v are cached as zeros, so that
    no value of it can reach a later query, even one that is 0 * inf).
    The tokens' k/v go into their slots of the preallocated cache, and the queries attend to all
    S = max_len slots, masked (later slots hold nothing yet, or a discarded turn). Grouped-query attention
    without copying k/v per query head: the g = H / H_kv query heads sharing a k/v head become g * T
    queries of that head, one attention call over (B, H_kv, g * T, hd), accumulated in float32 by the kernel.
    """
    B, T = x.shape[:2]
    H, H_kv, hd = attn.heads, attn.kv_heads, attn.head_dim
    q = attn.q_proj(x).view(B, T, H, hd).transpose(1, 2)                   # (B, H, T, hd)
    k = attn.k_proj(x).view(B, T, H_kv, hd).transpose(1, 2)                # (B, H_kv, T, hd)
    v = attn.v_proj(x).view(B, T, H_kv, hd).transpose(1, 2)
    q, k = qwen2.apply_rope(q, cos, sin), qwen2.apply_rope(k, cos, sin)
    if real is not None:
        k, v = k.where(real, 0.0), v.where(real, 0.0)
    cache = attn.cache
    cache.k.index_copy_(2, positions, k)                                   # their slots of (B, H_kv, S, hd)
    cache.v.index_copy_(2, positions, v)
    q = q.reshape(B, H_kv, H // H_kv * T, hd)                              # head h = kv * g + j, as in GQA
    out = F.scaled_dot_product_attention(q, cache.k, cache.v, attn_mask=mask)   # (B, H_kv, g * T, hd)
    out = out.reshape(B, H, T, hd).transpose(1, 2)                         # (B, T, H, hd); a GPU kernel's
    #                                                                        output need not be contiguous
    return attn.o_proj(out.reshape(B, T, H * hd))


def static_forward(llm, x, start, last):
    """Qwen2.forward(embeds=x, start, last_only=True) in the fixed-shape form a CUDA graph can replay.

    x (B, T, d): embeddings at positions start .. start+T-1 (a prompt may be padded to T: rows after the
    real ones write cache slots that a later step overwrites before any query sees them). start and
    last, (1,) int64 on the device: the first position, and the row whose logits are returned (the last
    real one). The same kernels serve every position. -> (B, 1, vocab). Needs llm.setup_cache() first.
    """
    T, S = x.shape[1], llm.max_len
    positions = start + torch.arange(T, device=x.device)                   # (T,)
    cos = llm.rope_cos.index_select(0, positions).to(x.dtype)              # (T, hd): their angles
    sin = llm.rope_sin.index_select(0, positions).to(x.dtype)
    later = torch.arange(S, device=x.device) > positions[:, None]          # (T, S): slots a row may not see
    mask = torch.zeros(T, S, dtype=x.dtype, device=x.device).masked_fill_(later, float("-inf"))
    mask = mask.repeat(llm.cfg.num_attention_heads // llm.cfg.num_key_value_heads, 1)   # (g * T, S)
    real = None if T == 1 else (torch.arange(T, device=x.device) <= last)[:, None]    # (T, 1)
    for layer in llm.layers:                                               # DecoderLayer.forward, unrolled
        x = x + static_attention(layer.self_attn, layer.input_layernorm(x), cos, sin, positions, mask, real)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return llm.lm_head(llm.norm(x.index_select(1, last)))


def decode_step(llm, token, pos):
    """One new token (B, 1) at position pos (1,) -> logits (B, 1, vocab): static_forward with T = 1."""
    return static_forward(llm, llm.embed_tokens(token), pos, torch.zeros_like(pos))


def capture_cuda_graph(fn):
    """Record fn() as a CUDA graph. Returns (replay, out): replay() reruns the recorded kernels on the same
    memory and leaves the new result in `out`. fn reads its inputs from tensors the caller refills.

    Following PyTorch's recipe: run fn on a side stream first (lazy initialisation, cuBLAS workspaces and
    kernel choice must not happen during capture), then capture. A side effect of fn (here: a write
    into the KV cache) happens in those warm-up runs too.
    """
    device = torch.cuda.current_device()
    if device not in _capture_streams:     # one per device: cuBLAS keeps a workspace for every stream it sees
        _capture_streams[device] = torch.cuda.Stream()
    stream, current = _capture_streams[device], torch.cuda.current_stream()
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    current.wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, stream=stream):
            out = fn()
    finally:
        torch.cuda.set_stream(current)     # also when ending the capture failed inside the `with`
    return graph.replay, out


_capture_streams = {}


# A prompt is padded to a multiple of this many tokens, so that one recorded prefill serves every prompt
# of its length class (a first turn is the image's 256 tokens and a question; a follow-up, a few dozen).
# Longer prompts than PREFILL_GRAPH_TOKENS (a whole conversation fed again, say) run the plain forward,
# where launches are a small part of the work; at most PREFILL_GRAPHS recorded lengths are kept.
PREFILL_BUCKET = 64
PREFILL_GRAPH_TOKENS = 1024
PREFILL_GRAPHS = 8


class GraphedQwen2(qwen2.Qwen2):
    """Qwen2 whose inference with a KV cache replays CUDA graphs of static_forward: one for the decode
    step, one per padded prompt length for the prefill. Training, and anything without a cache or
    without room for the padding, runs the plain forward.

    A graph is recorded at its first use and again whenever what it reads has moved: a new cache
    (setup_cache), new RoPE tables, the model moved or cast (its weights and tables are new tensors).
    Parameters replaced one by one after recording are not noticed: call drop_cache() after such surgery.
    It is recorded at the cache's last slots, so the warm-up runs of capture_cuda_graph write only slots
    that no visible position holds (each real step writes its own slots before reading them). Should
    recording fail (a torch or driver that cannot capture a kernel), the model says so once and runs
    the plain forward from then on.
    """

    capture = staticmethod(capture_cuda_graph)
    devices = ("cuda",)                             # tests on CPU add "cpu" and put a stand-in in `capture`

    def forward(self, tokens=None, embeds=None, start=0, last_only=False):
        x = embeds if embeds is not None else tokens
        T = x.shape[1]
        width = T if T == 1 else -(-T // PREFILL_BUCKET) * PREFILL_BUCKET     # the padded length
        if last_only and 0 < start + T <= self.max_len and not torch.is_grad_enabled():
            self._forget_after(start + T)           # a prompt, graphed or not: the decode graph reads every slot
        if (self.max_len == 0 or torch.is_grad_enabled() or (T > 1 and not last_only) or x.device != self.device
                or self.device.type not in self.devices or not 0 <= start <= self.max_len - width
                or width > PREFILL_GRAPH_TOKENS):
            return super().forward(tokens, embeds, start, last_only)
        if embeds is None and T > 1:
            embeds = self.embed_tokens(tokens)
        name = ("decode",) if T == 1 and embeds is None else ("prefill", width)
        with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
            graphs = self.__dict__.setdefault("_graphs", {})
            graph = graphs.get(name)
            if graph is None or graph["key"] != self._graph_key(x.shape[0]):
                graphs.pop(name, None)
                prefills = [n for n in graphs if n[0] == "prefill"]
                if name[0] == "prefill" and len(prefills) >= PREFILL_GRAPHS:
                    del graphs[prefills[0]]         # the least recently used (dicts keep their order)
                try:
                    graph = graphs[name] = self._record(name, tokens if name[0] == "decode" else embeds)
                except RuntimeError as e:           # speed lost, not the answer; tools/gpu_check.py reports it
                    self.devices, self._graphs = (), {}
                    warnings.warn(f"recording a CUDA graph failed ({type(e).__name__}: {e}); "
                                  "running the plain forward instead")
                    return super().forward(tokens, embeds, start, last_only)
            graphs[name] = graphs.pop(name)         # most recently used last
            if name[0] == "decode":
                graph["input"].copy_(tokens)
            else:
                graph["input"][:, :T].copy_(embeds)
                graph["input"][:, T:].zero_()
                graph["last"].fill_(T - 1)
            graph["start"].fill_(start)
            graph["replay"]()
            return graph["logits"].clone()          # the next replay overwrites graph["logits"]

    def _forget_after(self, end):
        """Zero every cache slot from `end` on before a prompt runs (graphed or, too long for a graph, plain).
        The graphs read all slots, masked or not, and 0 * NaN is NaN: what a failed turn (NaN logits,
        qwen2.NonFiniteLogits) left past the new prompt must not reach the decode graph after it. The
        plain model reads only slots it has just written."""
        for layer in self.layers:
            layer.self_attn.cache.k[:, :, end:] = 0
            layer.self_attn.cache.v[:, :, end:] = 0

    def _graph_key(self, batch):
        """What the recorded kernels read, by identity and address: when any of it changes, record again."""
        caches = tuple(id(layer.self_attn.cache) for layer in self.layers)
        q_proj = self.layers[0].self_attn.q_proj               # a LoRA adapter's layer holds it as base_layer
        weights = (self.embed_tokens.weight.data_ptr(), self.lm_head.weight.data_ptr(),
                   getattr(q_proj, "base_layer", q_proj).weight.data_ptr())
        return caches, weights, id(self.rope_cos), batch, self.max_len

    def _record(self, name, x):
        device, decode = self.device, name[0] == "decode"
        if decode:                                  # the inputs, refilled before every replay
            inputs = torch.zeros(x.shape[0], 1, dtype=torch.long, device=device)
        else:
            inputs = torch.zeros(x.shape[0], name[1], x.shape[2], dtype=x.dtype, device=device)
        start = torch.full((1,), self.max_len - inputs.shape[1], dtype=torch.long, device=device)
        last = torch.zeros(1, dtype=torch.long, device=device)

        def step():
            return decode_step(self, inputs, start) if decode else static_forward(self, inputs, start, last)

        # The attention kernel is chosen while recording. Memory-efficient attention (or the plain math) is
        # known to record: cuDNN's attention is left out, since with a mask over more than 1,024 keys some
        # cuDNN versions cannot be captured (NVIDIA's TransformerEngine turns it off there for cuDNN 9.14).
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            replay, logits = self.capture(step)
        # The recorded kernels read these objects: keeping them alive keeps their memory from being reused.
        keep = [layer.self_attn.cache for layer in self.layers] + [self.rope_cos, self.rope_sin]
        return {"key": self._graph_key(x.shape[0]), "replay": replay, "logits": logits, "input": inputs,
                "start": start, "last": last, "keep": keep}

    def setup_cache(self, max_len, batch=1):
        self._graphs = {}                           # they read the old cache: free both
        super().setup_cache(max_len, batch)

    def drop_cache(self):
        self._graphs = {}
        super().drop_cache()


# plain class -> its CUDA subclass
CUDA_SWAPS = {qwen2.Qwen2: GraphedQwen2}


def apply(model, quantize=None):
    """Every speed-up for where `model` runs, applied in place; parameters and buffers are untouched,
    unless `quantize="int8"` asks for the decoder's int8 weights (7., quantize_int8: CPU only).

    On CPU: the swaps of CPU_SWAPS, and every FastViTHD's weights stored channels-last. The fused
    kernels run only for float32 or bfloat16 without autograd (fast_path); elsewhere the swapped
    modules compute their plain forward. Call it after reparameterize(): the swaps fuse what the fused form computes.
    On CUDA: the swaps of CUDA_SWAPS (the decode step as a graph, without autograd only). Elsewhere
    (Apple's MPS) nothing is swapped.
    """
    first = next(model.parameters(), None)
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize must be None or 'int8', not {quantize!r}")
    if quantize == "int8":
        if first is not None and first.device.type != "cpu":
            raise ValueError(f"int8 weights run on the CPU only (torch's int8 kernel), not on {first.device.type}")
        quantize_int8(model)
    swaps = {"cpu": CPU_SWAPS, "cuda": CUDA_SWAPS}.get(None if first is None else first.device.type, {})
    for module in model.modules():
        fast = swaps.get(type(module))
        if fast is not None:
            module.__class__ = fast
    if swaps is CPU_SWAPS:
        for module in model.modules():
            if isinstance(module, repmixer.FastViTHD):
                module.to(memory_format=torch.channels_last)
    return model


# ----------------------------------------------------------------------------------------------------
# What a conversation (support/chat.py) does differently for speed on a GPU.
# ----------------------------------------------------------------------------------------------------

# k / 255 for every 8-bit k, divided on the CPU: numpy's correctly rounded float32 values (tests check all
# 256). A GPU gets them by table lookup, because torch's CUDA kernel for `x / 255.0` multiplies by a
# rounded 1/255 instead (a scalar divisor becomes its reciprocal: aten/src/ATen/native/cuda/
# BinaryDivTrueKernel.cu), one unit off in the last place for 126 of the 256 values.
PIXEL_VALUES = torch.arange(256, dtype=torch.float32).div_(255.0)
_pixel_tables = {}


def to_pixels(rgb, device="cpu", dtype=torch.float32):
    """fastvlm.to_pixels on `device` in `dtype`: (S, S, 3) uint8 -> (1, 3, S, S). On a GPU the 8-bit
    values travel, a quarter of the float copy, and are looked up there in PIXEL_VALUES."""
    device = torch.device(device)
    if device.type == "cpu":
        return FV.to_pixels(rgb).to(dtype)
    key = (str(device), dtype)
    if key not in _pixel_tables:
        _pixel_tables[key] = PIXEL_VALUES.to(device, dtype)
    return _pixel_tables[key][rgb.to(device).permute(2, 0, 1)[None].long()].contiguous()


def cache_length(needed, context):
    """The KV cache's length for a conversation that needs `needed` positions: grown in big steps, whole
    multiples of 64 (attention kernels want aligned rows), at least 1024, so that a chat reallocates it
    (and a GPU records its graphs again) rarely; never past the model's `context`."""
    return min(context, max(-(-2 * needed // 64) * 64, 1024))


@torch.no_grad()
def warm_up(chat, question, max_new_tokens=256, temperature=0.0, top_p=1.0):
    """Pay a device's one-time costs on a turn that is then forgotten, so that the chat's next ask() is
    timed in the steady state: on CUDA the first call of each kernel loads it and picks its algorithm
    (seconds for the encoder), and the first prefill and decode steps record their graphs (GraphedQwen2).
    The cache is sized for `question` and `max_new_tokens` first, as ask() will need it, so nothing is
    reallocated (and recorded again) after; with the same sampling options, so that their kernels are
    loaded too. Returns the seconds it took; the chat is as it was."""
    start = time.perf_counter()
    saved = list(chat.history), chat.pos, chat.image_embeds, chat.stop_ids, chat.timing
    chat.reserve(question, max_new_tokens)
    chat.stop_ids = set()                              # at least one decode step, whatever is sampled
    try:
        chat.ask(question, max_new_tokens=2, temperature=temperature, top_p=top_p)
    finally:
        chat.history, chat.pos, chat.image_embeds, chat.stop_ids, chat.timing = saved
    synchronize(chat.model.llm.device)                 # wait for what the device still has queued
    return time.perf_counter() - start


def synchronize(device):
    """Wait until `device` has run everything queued on it (GPUs run asynchronously): before a clock is read."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
