"""speedups.py: every swapped module computes what its plain self computes, on the same weights; the swap
changes no parameter; inference really runs on the fused kernels, training on the plain ops."""

import contextlib
import copy
from dataclasses import replace
import platform

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch.profiler import profile

from support import speedups
import fastvlm as FV
import qwen2 as Q
import repmixer as R
from support import loading  # noqa: E402

# float32 products of length <= a few hundred: the fused kernels sum in another order than the plain
# ones, ~1e-7 relative per term. The bound is elementwise: 1e-5 of each value plus 1e-5 of the output's
# typical magnitude (its mean |value|, at least 1, the size of the terms). A wrong post-op is far
# outside it: GELU's tanh
# form differs from the exact one by up to 4.7e-4 absolute (near x = -2.7), a missing bias, the layer
# scale on the wrong side or a transposed weight by O(1) of the output.
REL32 = 1e-5

# On x86-64 every torch CPU wheel is built with oneDNN; there a comparison with the fused kernels
# missing would compare the plain ops with themselves and prove nothing.
if platform.machine().lower() in ("x86_64", "amd64"):
    assert speedups.HAVE_FUSED_OPS, "this torch build lacks torch.ops.mkldnn._convolution_pointwise"



def swapped_modules(model):
    """The modules of `model` that speedups.apply() swapped for a faster class."""
    return [m for m in model.modules() if type(m) in (*speedups.CPU_SWAPS.values(), *speedups.CUDA_SWAPS.values())]

def both_paths(fn):
    """fn() on the plain ops and on the fused kernels, without autograd (the fused path's condition)."""
    with torch.no_grad():
        with speedups.plain_ops():
            plain = fn()
        fused = fn()
    return plain, fused


def assert_close(plain, fused, alive=False, rel=REL32, floor=1.0):
    """|fused - plain| <= rel * (|plain| + scale), element by element, where scale is the output's mean
    |value| but at least `floor`: the inputs and weights here are unit-scale, so every product sums O(1)
    terms, and an output that cancels to near 0 still carries their rounding."""
    assert plain.shape == fused.shape
    if alive:
        assert plain.std() > 1e-2, "the output vanished; the comparison would prove nothing"
    typical = max(plain.abs().mean().item(), floor)
    excess = (fused - plain).abs() - rel * (plain.abs() + typical)
    assert excess.max() <= 0, f"{int((excess > 0).sum())} of {plain.numel()} elements out of tolerance"


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


def conv_rel(case):
    """REL32 grown with the square root of the number of products a conv output sums, past 256 of them
    (a full 7x7 conv over 24 channels sums 1,176; rounding grows as the root of the count)."""
    c_in, _, k, _, depthwise = case[:5]
    return REL32 * max(1.0, ((1 if depthwise else c_in) * k * k / 256) ** 0.5)


@settings(deadline=None, max_examples=60)
@given(case=conv_cases, seed=st.integers(0, 2**31 - 1))
def test_conv_gelu_equals_gelu_of_conv(case, seed):
    conv, x = make_conv(case, seed)
    assert_close(*both_paths(lambda: speedups.conv_gelu(x, conv)), rel=conv_rel(case))


@settings(deadline=None, max_examples=60)
@given(case=conv_cases, seed=st.integers(0, 2**31 - 1))
def test_conv_scale_add_equals_residual_plus_scaled_conv(case, seed):
    conv, h = make_conv(case, seed)
    with torch.no_grad():
        shape = conv(h).shape
    residual = torch.randn(shape).contiguous(memory_format=torch.channels_last if case[6] else torch.contiguous_format)
    scale = torch.randn(shape[1], 1, 1)
    assert_close(*both_paths(lambda: speedups.conv_scale_add(h, conv, scale, residual)), rel=conv_rel(case))


@settings(deadline=None, max_examples=40)
@given(lead=st.lists(st.integers(1, 5), min_size=1, max_size=3), n_in=st.integers(1, 64),
       n_out=st.integers(1, 64), bias=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_linear_and_linear_gelu_equal_the_plain_ops(lead, n_in, n_out, bias, seed):
    torch.manual_seed(seed)
    layer = unit_scale(speedups.FastLinear(n_in, n_out, bias=bias))
    x = torch.randn(*lead, n_in)
    assert_close(*both_paths(lambda: layer(x)))
    assert_close(*both_paths(lambda: speedups.linear_gelu(x, layer)))


def profiled_ops(fn):
    """The aten / mkldnn ops fn() runs without autograd, each with its input shapes."""
    with torch.no_grad(), profile(record_shapes=True) as prof:
        fn()
    return prof.events()


SMALL = R.FastViTHDConfig(depths=(1, 1, 1, 1, 1), widths=(8, 16, 32, 64, 128), head_dim=8, image_size=128)
LLM = Q.Qwen2Config(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2)


def small_fastvlm(seed=0):
    """A small FastVLM in inference form (BatchNorm folded) with weights that keep every stage alive."""
    torch.manual_seed(seed)
    model = FV.FastVLM(SMALL, LLM, fused=True).eval()
    for name, p in model.named_parameters():
        p.data.normal_(0, 0.2 if "layer_scale" in name else 1.0 / max(1, p[0].numel()) ** 0.5)
    model.vision_tower.reparameterize()
    return model


def test_apply_swaps_modules_and_changes_no_parameter():
    plain = small_fastvlm()
    before = plain.state_dict()
    fast = speedups.apply(copy.deepcopy(plain))
    after = fast.state_dict()
    assert list(before) == list(after)
    assert all(torch.equal(before[k], after[k]) for k in before)
    swapped = {type(m) for m in fast.modules()} & set(speedups.CPU_SWAPS.values())
    assert swapped == set(speedups.CPU_SWAPS.values()), "a registered swap never happened"
    assert not swapped_modules(plain) and swapped_modules(fast)
    assert fast.vision_tower.stem[0].fused.weight.is_contiguous(memory_format=torch.channels_last)


def test_every_swapped_block_computes_its_plain_self():
    """Block by block: each swapped module, fed what its plain twin is fed, gives the same output."""
    plain = small_fastvlm()
    fast = speedups.apply(copy.deepcopy(plain))
    inputs = {}

    def record(name):
        def hook(module, args, out):                            # returns None: the output stays as it is
            inputs.setdefault(name, (args, out))
        return hook

    hooks = [m.register_forward_hook(record(name)) for name, m in plain.named_modules()]
    x = torch.rand(1, 3, 128, 192)
    with torch.no_grad():
        ids = torch.arange(12)
        plain.llm(embeds=plain.embed(ids, plain.encode_image(x)))
    for h in hooks:
        h.remove()
    fast_modules = dict(fast.named_modules())
    checked = set()
    for name, (args, expected) in inputs.items():
        module = fast_modules[name]
        if type(module) not in speedups.CPU_SWAPS.values() or not isinstance(expected, torch.Tensor):
            continue
        with torch.no_grad():
            got = module(*args)
        assert_close(expected, got)
        checked.add(type(module))
    assert checked == set(speedups.CPU_SWAPS.values())


def test_the_whole_model_agrees_swapped_and_plain():
    plain = small_fastvlm()
    fast = speedups.apply(copy.deepcopy(plain))
    x = torch.rand(1, 3, 192, 128)
    ids = torch.arange(12)
    with torch.no_grad():
        a = plain.llm(embeds=plain.embed(ids, plain.encode_image(x)))
        b = fast.llm(embeds=fast.embed(ids, fast.encode_image(x)))
        features = plain.vision_tower(x), fast.vision_tower(x)
    assert_close(*features, alive=True)
    assert_close(a, b, alive=True)


@pytest.mark.skipif(not speedups.HAVE_FUSED_OPS, reason="this torch build has no oneDNN fused kernels")
def test_inference_runs_on_the_fused_kernels_and_the_plain_model_does_not():
    """No separate GELU pass over a ConvFFN map, no BLAS matmul in the decoder: the wiring is real.
    And `fast=False` means it: the plain model runs none of the fused kernels."""
    plain = small_fastvlm()
    fast = speedups.apply(copy.deepcopy(plain))
    x = torch.rand(1, 3, 128, 128)
    events = profiled_ops(lambda: fast.vision_tower(x))
    names = {e.name for e in events}
    assert "mkldnn::_convolution_pointwise" in names and "mkldnn::_linear_pointwise" in names
    # The only GELU left is the final expansion's, after its squeeze-excite gate.
    gelus = [e for e in events if e.name == "aten::gelu"]
    assert len(gelus) == 1 and gelus[0].input_shapes[0][1] == SMALL.out_channels
    names = {e.name for e in profiled_ops(lambda: fast.llm(torch.arange(10)[None]))}
    assert "mkldnn::_linear_pointwise" in names
    assert not names & {"aten::mm", "aten::addmm"}, names
    plain_names = {e.name for e in profiled_ops(lambda: (plain.vision_tower(x), plain.llm(torch.arange(10)[None])))}
    assert not any(n.startswith("mkldnn::_") for n in plain_names), plain_names


def test_training_takes_the_plain_path_and_backpropagates():
    """The fused kernels have no autograd: with gradients on, every swapped module runs its plain forward,
    so the swapped training-form encoder gives the plain one's loss and gradients."""
    torch.manual_seed(0)
    plain = R.FastViTHD(SMALL).train()
    fast = speedups.apply(copy.deepcopy(plain))
    assert swapped_modules(fast)
    x = torch.rand(2, 3, 128, 128)
    losses = []
    for model in (plain, fast):
        with torch.enable_grad():
            loss = model(x).square().mean()
            loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for (name, a), b in zip(plain.named_parameters(), fast.parameters()):
        assert a.grad is not None and b.grad is not None, name
        # channels-last weights change the summation order of the convs, and the backward pass through
        # five stages amplifies it (up to ~1e-4 measured): 1e-3 here; a wrong path is an O(1) difference
        assert_close(a.grad, b.grad, rel=1e-3, floor=1e-3)            # (gradients are small: a lower floor)
    assert sum(p.grad.abs().sum() for p in plain.parameters()) > 0


def test_a_block_whose_activation_is_not_the_exact_gelu_runs_its_plain_forward():
    """The fused kernels apply the exact GELU; a swapped block with any other activation must not use them."""
    plain = small_fastvlm().vision_tower
    for m in plain.modules():
        if isinstance(m, (R.MobileOneBlock, R.LargeKernelConv, R.ConvFFN)) and isinstance(m.act, torch.nn.GELU):
            m.act = torch.nn.GELU(approximate="tanh")
    fast = speedups.apply(copy.deepcopy(plain))
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        assert_close(plain(x), fast(x), alive=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_the_fused_kernels_run_in_float32_and_bfloat16_only(dtype):
    """oneDNN's fused ops are for float32 and bfloat16 here (tests/test_precision.py checks bfloat16):
    float64 they refuse, and float16 is not a CPU dtype this project runs. In any other dtype the swapped
    model runs no fused kernel, and gives exactly what it gives with them switched off. (The stem and
    first stage stand for the encoder: their swapped blocks run both fused kernels, and float64 convs
    are slow.)"""
    fast = speedups.apply(small_fastvlm().to(dtype))
    x, ids = torch.rand(1, 3, 64, 64, dtype=dtype), torch.arange(10)[None]
    encoder = fast.vision_tower
    with profile() as prof:
        outputs = both_paths(lambda: encoder.stages[0](encoder.stem(x))), both_paths(lambda: fast.llm(ids))
    names = {e.name for e in prof.events()}
    assert not any(n.startswith("mkldnn::_") for n in names), names
    for plain, fused in outputs:
        assert torch.equal(plain, fused) and plain.float().std() > 1e-2


def conv_like(conv, layout):
    """Unit-scale weights, and the conv in `layout` (the inputs below are made in the same one)."""
    return unit_scale(conv).to(memory_format=layout)


# Convs the fused paths must leave to the plain ops: oneDNN pads with zeros by a list of numbers, and a
# 1x1 conv runs as a matmul only when it mixes all channels.
PLAIN_ONLY = {
    "reflect": lambda: nn.Conv2d(4, 8, 3, padding=1, padding_mode="reflect"),
    "circular": lambda: nn.Conv2d(4, 8, 3, padding=1, padding_mode="circular"),
    "same": lambda: nn.Conv2d(4, 8, 3, padding="same"),
    "grouped_1x1": lambda: nn.Conv2d(8, 8, 1, groups=4),
    "depthwise_1x1": lambda: nn.Conv2d(8, 8, 1, groups=8),
}


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("kind", sorted(PLAIN_ONLY))
def test_convs_the_fused_kernels_cannot_compute_give_their_own_result(kind, layout):
    """A conv padding by reflection, by wrapping around or by "same", and a grouped 1x1 conv on a small
    map: conv_gelu and conv_scale_add give what the plain conv gives (a fused op would pad with zeros,
    or multiply by a weight of the wrong shape)."""
    torch.manual_seed(0)
    conv = conv_like(PLAIN_ONLY[kind](), layout)
    x = torch.randn(2, conv.in_channels, 6, 6).contiguous(memory_format=layout)
    residual = torch.randn(2, 8, 6, 6).contiguous(memory_format=layout)
    scale = torch.randn(8, 1, 1)
    assert_close(*both_paths(lambda: speedups.conv_gelu(x, conv)), alive=True)
    assert_close(*both_paths(lambda: speedups.conv_scale_add(x, conv, scale, residual)), alive=True)


def test_the_swapped_encoder_takes_its_image_channels_last():
    """The swapped encoder's weights are stored channels-last; an NCHW image is converted before the first
    conv, so that no conv of the encoder converts layouts on its own (the layout is the speed-up)."""
    fast = speedups.apply(small_fastvlm()).vision_tower
    seen = []
    fast.stem[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    image = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        fast(image)
    assert not image.is_contiguous(memory_format=torch.channels_last)
    assert len(seen) == 1 and seen[0].is_contiguous(memory_format=torch.channels_last)


def test_plain_ops_puts_back_the_switch_it_found():
    """plain_ops() (and flop_counter(), built on it) restore `speedups.enabled` as it was: after a block
    inside another one the outer block still runs the plain ops, and a user's `enabled = False` survives
    a FLOP count."""
    before = speedups.enabled
    try:
        speedups.enabled = True
        with speedups.plain_ops():
            with speedups.plain_ops():
                pass
            assert speedups.enabled is False
        assert speedups.enabled is True
        speedups.enabled = False
        with speedups.flop_counter():
            pass
        assert speedups.enabled is False
    finally:
        speedups.enabled = before


def test_load_model_applies_the_speed_step_unless_told_not_to(tmp_path):
    from synthetic import write_fastvlm_checkpoint

    folder = write_fastvlm_checkpoint(tmp_path / "m", vision_cfg=SMALL)
    fast, _, _ = loading.load_model(folder)
    plain, _, _ = loading.load_model(folder, fast=False)
    assert swapped_modules(fast) and not swapped_modules(plain)
    assert plain.vision_tower.is_fused                       # folded all the same
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        assert_close(plain.encode_image(x), fast.encode_image(x), alive=True)


def test_flop_counter_counts_cpu_attention_as_its_matrix_products():
    """torch's counter has no formula for the CPU attention kernel; speedups.flop_counter() adds one that
    counts what the plain softmax(q k^T) v math counts (and only the lower triangle when causal)."""
    torch.manual_seed(0)
    attn = R.MHSA(64, head_dim=16)
    x = torch.randn(1, 64, 8, 6)                                # N = 48 positions, 4 heads
    counts = {}
    for use_sdpa in (True, False):
        attn.use_sdpa = use_sdpa
        with speedups.flop_counter() as counter:
            attn(x)
        counts[use_sdpa] = counter.get_total_flops()
    linears = 2 * 48 * 64 * (3 * 64) + 2 * 48 * 64 * 64
    assert counts[True] == counts[False] == linears + 2 * (2 * 4 * 48 * 48 * 16)

    q, kv = torch.randn(1, 4, 10, 8), torch.randn(1, 2, 10, 8)  # grouped-query, causal: 55 of 100 scores
    with speedups.flop_counter() as counter:
        torch.nn.functional.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True)
    assert counter.get_total_flops() == 2 * (2 * 4 * 55 * 8)


# ----------------------------------------------------------------------------------------------------
# The decode step as a CUDA graph: its fixed-shape form on any device, the graph itself on CUDA.
# ----------------------------------------------------------------------------------------------------

DECODER = Q.Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2)


def small_decoder(seed=0, device="cpu", dtype=torch.float32):
    torch.manual_seed(seed)
    return Q.Qwen2(DECODER).init_weights(std=0.2).to(device, dtype).eval()   # 0.2: logits spread over several units


def read_memory(llm):
    """What a recorded graph reads besides the weights: the cache tensors and the RoPE tables."""
    caches = [t for layer in llm.layers for t in (layer.self_attn.cache.k, layer.self_attn.cache.v)]
    return [t.data_ptr() for t in caches + [llm.rope_cos, llm.rope_sin]]


def stand_in_capture(llm, recorded=None):
    """capture_cuda_graph off CUDA: 'replaying' reruns fn into the same output tensor, after checking that
    the memory fn reads is still the memory it read when recorded (a real graph would read the old)."""
    def capture(fn):
        out, memory = fn(), read_memory(llm)
        if recorded is not None:
            recorded.append(llm.max_len)

        def replay():
            assert read_memory(llm) == memory, "replayed a graph whose cache or RoPE tables have moved"
            out.copy_(fn())
        return replay, out
    return capture


def graphed(llm, recorded=None):
    """A copy of llm swapped to GraphedQwen2, on CPU with the stand-in capture (the wiring, not the graph)."""
    model = copy.deepcopy(llm)
    model.__class__ = speedups.GraphedQwen2
    model.devices = ("cpu",)
    model.capture = stand_in_capture(model, recorded)
    return model


@torch.no_grad()
def test_decode_step_equals_the_plain_forward_at_every_position():
    plain = small_decoder()
    fixed = copy.deepcopy(plain)
    plain.setup_cache(48)
    fixed.setup_cache(48)
    prompt = torch.randint(0, 512, (1, 9))
    plain(prompt, start=0)
    fixed(prompt, start=0)                                  # both caches hold the prompt
    token = torch.tensor([[7]])
    for pos in range(9, 47):
        a = plain(token, start=pos)[:, -1]
        b = speedups.decode_step(fixed, token, torch.tensor([pos]))[:, -1]
        assert_close(a, b, alive=True)
        assert int(a.argmax()) == int(b.argmax())
        token = a.argmax(-1, keepdim=True)
    for layer_a, layer_b in zip(plain.layers, fixed.layers):   # the same keys and values were cached
        torch.testing.assert_close(layer_a.self_attn.cache.k, layer_b.self_attn.cache.k, rtol=1e-5, atol=1e-5)


def plain_and_graphed(weights_seed, prompt_tokens, cache, **generate):
    """The same prompt through a small decoder, plainly and graphed: (plain's answer, graphed's, the graphed model)."""
    plain = small_decoder(weights_seed)
    fast = graphed(plain)
    prompt = torch.randint(0, 512, (1, prompt_tokens))
    outs = []
    for model in (plain, fast):
        model.setup_cache(cache)
        outs.append(Q.generate(model, tokens=prompt, **generate))
    return outs[0], outs[1], fast


@torch.no_grad()
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_graphed_decoder_generates_the_eager_tokens(temperature):
    a, b, fast = plain_and_graphed(1, 11, 64, max_new_tokens=40, temperature=temperature, top_p=0.95, seed=5)
    outs = [a, b]
    assert outs[0] == outs[1]
    assert len(set(outs[0][0])) > 5                         # a varied answer, not one repeated token
    assert ("decode",) in fast._graphs                      # and the graph path ran


@torch.no_grad()
def test_graph_is_recorded_again_when_the_cache_grows_and_a_follow_up_matches():
    """A longer conversation reallocates the cache (Chat grows it): replaying the old recording would
    write into freed memory. Recording uses the cache's last slot only, never a visible one."""
    plain = small_decoder(2)
    fast = graphed(plain)
    prompt = torch.randint(0, 512, (1, 6))
    answers = []
    for model in (plain, fast):
        model.setup_cache(32)
        first, pos = Q.generate(model, tokens=prompt, max_new_tokens=10)
        key = model is fast and model._graphs[("decode",)]["key"]
        model.setup_cache(96)                               # keeps what is cached, in new tensors
        if model is fast:
            assert model._graphs == {}                      # the old recordings and cache are freed at once
        second, pos = Q.generate(model, tokens=torch.tensor([first[-3:]]), start=pos, max_new_tokens=30)
        if model is fast:
            assert model._graphs[("decode",)]["key"] != key and ("prefill", 64) in model._graphs
        Q.Qwen2.setup_cache(model, 96)                      # the plain method: same size, new tensors, and
        third, _ = Q.generate(model, tokens=torch.tensor([second[-2:]]), start=pos, max_new_tokens=10)
        #                                                     the key alone must see that the cache moved
        answers.append((first, second, third))
    assert answers[0] == answers[1]
    fast.drop_cache()
    assert fast._graphs == {}


@torch.no_grad()
@pytest.mark.parametrize("name, written", [(("decode",), 1), (("prefill", 64), 64)])
def test_recording_writes_only_the_last_cache_slots(name, written):
    fast = graphed(small_decoder(3))
    fast.setup_cache(96)
    for layer in fast.layers:                                           # a mark in every free slot
        layer.self_attn.cache.k.fill_(7.0)
        layer.self_attn.cache.v.fill_(7.0)
    Q.Qwen2.forward(fast, torch.randint(0, 512, (1, 5)), start=0)      # a prompt in slots 0 .. 4, plainly
    before = [(layer.self_attn.cache.k.clone(), layer.self_attn.cache.v.clone()) for layer in fast.layers]
    fast._record(name, torch.zeros(1, 1, DECODER.hidden_size))
    for (k, v), layer in zip(before, fast.layers):
        cache, kept = layer.self_attn.cache, 96 - written
        assert torch.equal(cache.k[:, :, :kept], k[:, :, :kept]) and torch.equal(cache.v[:, :, :kept], v[:, :, :kept])
        assert (cache.k[:, :, kept:] != 7.0).all()                     # the warm-up did write the last ones


@torch.no_grad()
@pytest.mark.parametrize("lengths", [(5, 3, 1), (64, 65, 2), (130, 7, 40)])
def test_padded_prefill_graphs_answer_as_the_plain_model(lengths):
    """Turns of these prompt lengths (each padded to a multiple of 64 and replayed from one recording
    per padded length): the same greedy tokens, and the same cached keys and values, as the plain
    decoder. The padding's own slots are overwritten before any query sees them."""
    plain = small_decoder(5)
    fast = graphed(plain)
    torch.manual_seed(11)
    turns = [torch.randn(1, n, DECODER.hidden_size) * 0.5 for n in lengths]
    outs = []
    for model in (plain, fast):
        model.setup_cache(512)
        pos, answers = 0, []
        for embeds in turns:
            ids, pos = Q.generate(model, embeds=embeds, start=pos, max_new_tokens=12)
            answers.append(ids)
        outs.append((answers, pos))
    assert outs[0] == outs[1]
    assert sum(len(set(a)) for a in outs[0][0]) > 10
    widths = {n if n == 1 else -(-n // 64) * 64 for n in lengths}          # a single embedding is not padded
    assert {name for name in fast._graphs if name[0] == "prefill"} == {("prefill", w) for w in widths}
    end = outs[0][1]
    for a, b in zip(plain.layers, fast.layers):
        torch.testing.assert_close(a.self_attn.cache.k[:, :, :end], b.self_attn.cache.k[:, :, :end],
                                   rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_static_forward_takes_a_gpu_kernels_output_layout(monkeypatch):
    """CUDA's memory-efficient attention returns its output as a transposed view, not contiguous:
    everything after it must reshape, never view. Simulated here with the CPU kernel's values."""
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda *a, **k: sdpa(*a, **k).transpose(1, 2).contiguous().transpose(1, 2))
    a, b, fast = plain_and_graphed(10, 70, 256, max_new_tokens=12)
    assert a == b and {("decode",), ("prefill", 128)} <= set(fast._graphs)


@torch.no_grad()
def test_no_nan_reaches_a_graph_through_masked_slots():
    """The graphs read every cache slot, masked or not, and 0 * NaN is NaN: a failed turn's keys and
    values are zeroed before the next prompt's graph runs, and a padded prompt's padding caches zeros."""
    torch.manual_seed(7)
    llm = graphed(Q.Qwen2(replace(DECODER, tie_word_embeddings=False)).init_weights(std=0.2).eval())
    for layer in llm.layers:                                    # k/v biases, as Qwen2 has: a zero row's k/v
        layer.self_attn.k_proj.bias.normal_(0, 0.2)             # is not zero
        layer.self_attn.v_proj.bias.normal_(0, 0.2)
    prompt = torch.randint(0, 512, (1, 5))
    first = poisoned_after_first_token(llm, prompt)
    with pytest.raises(Q.NonFiniteLogits):
        Q.generate(llm, tokens=prompt, max_new_tokens=5)       # its NaN keys and values were cached
    assert any(layer.self_attn.cache.k.isnan().any() for layer in llm.layers)   # what the next turn must not meet
    llm.embed_tokens.weight[first] = 0.0                        # repaired: the next turn must be clean
    plain = copy.deepcopy(llm)
    plain.__class__ = Q.Qwen2
    answers = []
    for model in (plain, llm):
        model.setup_cache(128)
        answers.append(Q.generate(model, tokens=prompt, max_new_tokens=8))
    assert answers[0] == answers[1]
    for layer in llm.layers:                                    # the padding of the 5-token prompt: zeros
        assert torch.equal(layer.self_attn.cache.k[:, :, 5 + 8:64], torch.zeros_like(layer.self_attn.cache.k[:, :, 5 + 8:64]))


@torch.no_grad()
def test_a_prompt_too_long_for_a_graph_clears_what_a_failed_turn_left():
    """A prompt longer than PREFILL_GRAPH_TOKENS runs the plain forward, but the decode graph after it
    still reads every slot: NaN that a failed turn left past the prompt must be gone all the same."""
    fast = graphed(small_decoder(3))
    fast.setup_cache(1536)
    for layer in fast.layers:                                 # what a failed turn left far past the prompt
        layer.self_attn.cache.k[:, :, 1100:1500] = float("nan")
        layer.self_attn.cache.v[:, :, 1100:1500] = float("nan")
    plain = copy.deepcopy(fast)
    plain.__class__ = Q.Qwen2
    prompt = torch.randint(0, 512, (1, 1030))
    assert 1030 > speedups.PREFILL_GRAPH_TOKENS
    assert Q.generate(fast, tokens=prompt, max_new_tokens=4) == Q.generate(plain, tokens=prompt, max_new_tokens=4)
    assert ("decode",) in fast._graphs                         # the answer came through the decode graph


@torch.no_grad()
def test_prefill_graphs_are_kept_for_a_few_lengths_only(monkeypatch):
    """Each recorded length holds GPU memory: the least recently used goes; prompts longer than
    PREFILL_GRAPH_TOKENS (a whole conversation fed again) are not recorded at all."""
    monkeypatch.setattr(speedups, "PREFILL_GRAPHS", 3)
    fast = graphed(small_decoder(12))
    fast.setup_cache(1536)
    for n in (10, 70, 130, 200, 10):                         # padded to 64, 128, 192, 256, then 64 again
        fast(torch.randint(0, 512, (1, n)), start=0, last_only=True)
    assert list(fast._graphs) == [("prefill", 192), ("prefill", 256), ("prefill", 64)]
    fast(torch.randint(0, 512, (1, 1030)), start=0, last_only=True)
    assert list(fast._graphs) == [("prefill", 192), ("prefill", 256), ("prefill", 64)]


@torch.no_grad()
def test_a_failed_recording_falls_back_to_the_plain_forward():
    """A torch or driver that cannot capture some kernel must cost speed, not the answer."""
    plain = small_decoder(9)
    fast = graphed(plain)

    def cannot_capture(fn):
        raise RuntimeError("operation not permitted when stream is capturing")

    fast.capture = cannot_capture
    prompt = torch.randint(0, 512, (1, 7))
    outs = []
    for model in (plain, fast):
        model.setup_cache(128)
        with pytest.warns(UserWarning, match="recording a CUDA graph failed") if model is fast else contextlib.nullcontext():
            outs.append(Q.generate(model, tokens=prompt, max_new_tokens=20))
    assert outs[0] == outs[1] and fast.devices == () and fast._graphs == {}


def test_graph_path_is_for_inference_only():
    """Prefill, embeddings and autograd take the plain forward: a graph has no backward."""
    fast = graphed(small_decoder(4))
    fast.setup_cache(16)
    fast(torch.randint(0, 512, (1, 4)))                      # grad on: plain, records nothing
    fast(torch.tensor([[3]]), start=4)
    assert getattr(fast, "_graphs", {}) == {}


CUDA = torch.cuda.is_available()


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (CI has none): replays the decode step as a real CUDA graph")
@torch.no_grad()
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_cuda_graph_generates_the_eager_tokens_in_float32(temperature):
    plain = small_decoder(6, device="cuda")
    fast = speedups.apply(copy.deepcopy(plain))
    assert type(fast) is speedups.GraphedQwen2
    prompt = torch.randint(0, 512, (1, 11), device="cuda")
    outs = []
    for model in (plain, fast):
        model.setup_cache(128)
        outs.append(Q.generate(model, tokens=prompt, max_new_tokens=60, temperature=temperature, seed=9))
    assert outs[0] == outs[1] and ("decode",) in fast._graphs and ("prefill", 64) in fast._graphs
    assert len(set(outs[0][0])) > 5


def poisoned_after_first_token(llm, prompt):
    """Make the embedding of the first greedy token non-finite (an untied model: its logit is unchanged),
    so that the prefill is finite and the first decode step, the graph's, is not."""
    llm.setup_cache(32)
    first = int(llm(prompt, start=0, last_only=True)[0, -1].argmax())
    llm.embed_tokens.weight[first] = float("inf")
    return first


@torch.no_grad()
def test_graph_path_keeps_the_non_finite_check():
    torch.manual_seed(7)
    llm = graphed(Q.Qwen2(replace(DECODER, tie_word_embeddings=False)).init_weights(std=0.2).eval())
    prompt = torch.randint(0, 512, (1, 5))
    poisoned_after_first_token(llm, prompt)
    with pytest.raises(Q.NonFiniteLogits, match="after 1 new tokens"):
        Q.generate(llm, tokens=prompt, max_new_tokens=5)
    assert ("decode",) in llm._graphs                       # the poisoned step was the graph's


@torch.no_grad()
def test_a_position_outside_the_cache_never_reaches_a_graph():
    """On a GPU an index past the cache would end the process; here it is the plain forward's error."""
    llm = graphed(small_decoder(8))
    llm.setup_cache(16)
    with pytest.raises(ValueError, match="exceeds the cache of 16"):
        llm(torch.tensor([[1]]), start=16)
    assert llm._graphs == {}


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (CI has none): the graph keeps the non-finite check in float16")
@torch.no_grad()
def test_cuda_graph_keeps_the_non_finite_check_in_float16():
    torch.manual_seed(7)
    llm = Q.Qwen2(replace(DECODER, tie_word_embeddings=False)).init_weights(std=0.2).to("cuda", torch.float16).eval()
    llm = speedups.apply(llm)
    prompt = torch.randint(0, 512, (1, 5), device="cuda")
    poisoned_after_first_token(llm, prompt)
    with pytest.raises(Q.NonFiniteLogits, match="after 1 new tokens"):
        Q.generate(llm, tokens=prompt, max_new_tokens=5)
    assert ("decode",) in llm._graphs
