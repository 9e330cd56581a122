"""onednn.py: the fused CPU kernels compute the plain expressions beside them, and inference uses them."""

import platform

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st
from torch.profiler import profile

import onednn
import qwen2 as Q
import repmixer as R

# float32 products of length <= a few hundred: the fused kernels sum in another order than the plain
# ones, ~1e-7 relative per term. A wrong post-op (GELU's tanh form, a missing bias, the layer scale on
# the wrong side, a transposed weight) is an O(1e-3) to O(1) error, so 1e-5 separates the two.
REL32 = 1e-5

# On x86-64 every torch CPU wheel is built with oneDNN; there a comparison with the fused kernels
# missing would compare the plain ops with themselves and prove nothing.
if platform.machine().lower() in ("x86_64", "amd64"):
    assert onednn.HAVE_FUSED_OPS, "this torch build lacks torch.ops.mkldnn._convolution_pointwise"


def both_paths(fn):
    """fn() on the plain ops and on the fused kernels, without autograd (the fused path's condition)."""
    with torch.no_grad():
        with onednn.plain_ops():
            plain = fn()
        fused = fn()
    return plain, fused


def assert_close(plain, fused, alive=False):
    """Within REL32 of the output's scale; weights and inputs are unit-scale, so that scale is >= 1."""
    assert plain.shape == fused.shape
    if alive:
        assert plain.std() > 1e-2, "the output vanished; the comparison would prove nothing"
    assert (fused - plain).abs().max() <= REL32 * max(plain.abs().max(), 1.0)


def unit_scale(module):
    for p in module.parameters():
        p.data.normal_()
    return module


conv_cases = st.tuples(
    st.integers(1, 24),                  # input channels
    st.integers(1, 3),                   # output channels per input channel (depthwise) or / 8 (full)
    st.sampled_from([1, 3, 7]),          # kernel
    st.sampled_from([1, 2]),             # stride
    st.booleans(),                       # depthwise
    st.integers(1, 40),                  # side: maps below and above SMALL_MAP_PIXELS (matmul vs conv)
    st.booleans(),                       # channels-last
    st.booleans(),                       # bias
)


def make_conv(case, seed):
    c_in, mult, k, stride, depthwise, side, channels_last, bias = case
    torch.manual_seed(seed)
    c_out = c_in * mult if depthwise else 8 * mult
    conv = unit_scale(nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=c_in if depthwise else 1, bias=bias))
    x = torch.randn(2, c_in, side, side)
    if channels_last:
        conv, x = conv.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    return conv, x


@settings(deadline=None, max_examples=60)
@given(case=conv_cases, seed=st.integers(0, 2**31 - 1))
def test_conv_gelu_equals_gelu_of_conv(case, seed):
    conv, x = make_conv(case, seed)
    assert_close(*both_paths(lambda: onednn.conv_gelu(x, conv)))


@settings(deadline=None, max_examples=60)
@given(case=conv_cases, seed=st.integers(0, 2**31 - 1))
def test_conv_scale_add_equals_residual_plus_scaled_conv(case, seed):
    conv, h = make_conv(case, seed)
    with torch.no_grad():
        shape = conv(h).shape
    residual = torch.randn(shape).contiguous(memory_format=torch.channels_last if case[6] else torch.contiguous_format)
    scale = torch.randn(shape[1], 1, 1)
    assert_close(*both_paths(lambda: onednn.conv_scale_add(h, conv, scale, residual)))


@settings(deadline=None, max_examples=40)
@given(lead=st.lists(st.integers(1, 5), min_size=1, max_size=3), n_in=st.integers(1, 64),
       n_out=st.integers(1, 64), bias=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_linear_and_linear_gelu_equal_the_plain_ops(lead, n_in, n_out, bias, seed):
    torch.manual_seed(seed)
    layer = unit_scale(onednn.Linear(n_in, n_out, bias=bias))
    x = torch.randn(*lead, n_in)
    assert_close(*both_paths(lambda: layer(x)))
    assert_close(*both_paths(lambda: onednn.linear_gelu(x, layer)))


def profiled_ops(fn):
    """The aten / mkldnn ops fn() runs without autograd, each with its input shapes."""
    with torch.no_grad(), profile(record_shapes=True) as prof:
        fn()
    return prof.events()


SMALL = R.FastViTHDConfig(depths=(1, 1, 1, 1, 1), widths=(8, 16, 32, 64, 128), head_dim=8, image_size=128)


@pytest.mark.skipif(not onednn.HAVE_FUSED_OPS, reason="this torch build has no oneDNN fused kernels")
def test_inference_encoder_and_decoder_run_on_the_fused_kernels():
    """No separate GELU pass over a ConvFFN map, no BLAS matmul in the decoder: the wiring is real."""
    torch.manual_seed(0)
    enc = R.FastViTHD(SMALL, fused=True).optimize_for_inference()
    x = torch.rand(1, 3, 128, 128).contiguous(memory_format=torch.channels_last)
    events = profiled_ops(lambda: enc(x))
    names = {e.name for e in events}
    assert "mkldnn::_convolution_pointwise" in names and "mkldnn::_linear_pointwise" in names
    # The only GELU left is the final expansion's, after its squeeze-excite gate.
    gelus = [e for e in events if e.name == "aten::gelu"]
    assert len(gelus) == 1 and gelus[0].input_shapes[0][1] == SMALL.out_channels

    cfg = Q.Qwen2Config(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2)
    llm = Q.Qwen2(cfg).eval()
    names = {e.name for e in profiled_ops(lambda: llm(torch.arange(10)[None]))}
    assert "mkldnn::_linear_pointwise" in names
    assert not names & {"aten::mm", "aten::addmm"}, names


def test_training_takes_the_plain_path_and_backpropagates():
    """The fused kernels have no autograd: with gradients on, every helper must run the plain ops."""
    torch.manual_seed(0)
    enc = R.FastViTHD(SMALL).train()
    with torch.enable_grad():
        enc(torch.rand(2, 3, 128, 128)).square().mean().backward()
    grads = [p.grad for p in enc.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


def test_the_whole_encoder_agrees_on_both_paths():
    torch.manual_seed(0)
    enc = R.FastViTHD(SMALL, fused=True).eval()
    for p in enc.parameters():
        p.data.normal_(0, 0.2)
    enc.optimize_for_inference()
    x = torch.rand(1, 3, 192, 128).contiguous(memory_format=torch.channels_last)
    assert_close(*both_paths(lambda: enc(x)), alive=True)


def test_flop_counter_counts_cpu_attention_as_its_matrix_products():
    """torch's counter has no formula for the CPU attention kernel; onednn.flop_counter() adds one that
    counts what the plain softmax(q k^T) v math counts (and only the lower triangle when causal)."""
    torch.manual_seed(0)
    attn = R.MHSA(64, head_dim=16)
    x = torch.randn(1, 64, 8, 6)                                # N = 48 positions, 4 heads
    counts = {}
    for use_sdpa in (True, False):
        attn.use_sdpa = use_sdpa
        with onednn.flop_counter() as counter:
            attn(x)
        counts[use_sdpa] = counter.get_total_flops()
    linears = 2 * 48 * 64 * (3 * 64) + 2 * 48 * 64 * 64
    assert counts[True] == counts[False] == linears + 2 * (2 * 4 * 48 * 48 * 16)

    q, kv = torch.randn(1, 4, 10, 8), torch.randn(1, 2, 10, 8)  # grouped-query, causal: 55 of 100 scores
    with onednn.flop_counter() as counter:
        torch.nn.functional.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True)
    assert counter.get_total_flops() == 2 * (2 * 4 * 55 * 8)
