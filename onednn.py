"""Fused CPU kernels: the same math as the plain PyTorch expression beside each, in fewer passes.

Why this file exists. On a CPU, FastVLM's time to first token is matrix products: the encoder's 1x1
convs and the LLM's linears, ~690 GFLOP at 1024 px with the 0.5B model. PyTorch's eager ops leave
three things on the table, each measured on the 2-core AMD EPYC of the README (fp32, 2 threads):

1. An activation after a conv is a second pass over a large map. The ConvFFN's expansion writes a
   (B, 4C, H, W) map (25 MB at stage 3) that `F.gelu` then reads and writes again; the erf makes it
   compute-heavy too. oneDNN can apply the exact (erf) GELU to each output tile while it is still in
   registers (a "post-op"): 1x1 conv + GELU at stage 2 went from 109 ms to 90 ms.
2. A residual add after a conv is another pass; oneDNN adds the residual as a post-op as well.
   `x + ls * conv(h)` needs the layer scale `ls` folded into the conv first: ls * (W h + b) =
   (ls W) h + ls b, a product over the (small) weight instead of the (large) output map.
3. `F.linear` calls the BLAS (MKL), which on this AMD CPU ran Qwen2's shapes slower than oneDNN's own
   matmul kernels: 0.5B prefill gate/up projection 45.6 -> 35.8 ms, the lm_head of one decode step
   40 -> 25 ms. And oneDNN's 1x1 conv kernel is slow on a small map with many channels (stage 5's
   6144 -> 1536 conv over 16x16 pixels: 200 ms channels-last), where the same product as a matmul
   over the pixels takes 70 ms.

torch exposes oneDNN's fused kernels as `torch.ops.mkldnn._convolution_pointwise` and
`torch.ops.mkldnn._linear_pointwise`, the ops that torch.compile's CPU backend emits. They are private
and have no autograd, so they run only when every condition of `fast_path()` holds: CPU tensors in
float32, no gradient being recorded, a build that has them, and `enabled` left True. Otherwise each
helper runs the plain expression written beside it, which is the definition the tests compare the
fused kernels against (tests/test_onednn.py). Results agree to float32 rounding (~1e-6 relative);
set `onednn.enabled = False` to get the plain ops everywhere.
"""

from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

enabled = True

_OPS = torch.ops.mkldnn
HAVE_FUSED_OPS = (torch.backends.mkldnn.is_available()
                  and hasattr(_OPS, "_convolution_pointwise") and hasattr(_OPS, "_linear_pointwise"))

# Up to this many pixels a 1x1 conv runs as a matmul over the pixels (see 3. above): stage 5 at 1024 px
# has 256 pixels; stage 4 has 1024, where the conv kernel measured ~0.1 s faster over its 4 blocks.
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

        with onednn.flop_counter() as counter:
            model(x)
        counter.get_total_flops()

    The counter sees aten ops only, hence the plain ops (the fused kernels compute the same products).
    torch 2.13's counter has formulas for the GPU attention kernels but not for the CPU one that
    `F.scaled_dot_product_attention` runs here, so it would count attention as 0 FLOPs (at 1024 px:
    14 of FastViTHD's GFLOPs, and half of ViT-L/14's). `_count_cpu_attention` fills that in.
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


def fast_path(*tensors):
    """True when oneDNN's fused kernels may replace the plain ops for these tensors."""
    return (enabled and HAVE_FUSED_OPS and not torch.is_grad_enabled()
            and all(t is None or (t.device.type == "cpu" and t.dtype == torch.float32) for t in tensors))


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state dict) whose CPU inference goes to oneDNN's matmul (3.)."""

    def forward(self, x):                                       # (..., in) -> (..., out)
        if fast_path(x, self.weight, self.bias) and x.is_contiguous():
            return _OPS._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


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
