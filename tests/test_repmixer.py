"""FastViTHD: reparameterization is exact, shapes and counts match the release, outputs match timm."""

import copy
import json
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st
from safetensors.torch import load_file

import repmixer as R
from synthetic import REFERENCE, synthetic_image, synthetic_state_dict
from tolerance import assert_close
from support import loading  # noqa: E402
from support.checkpoint import load_exact  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"

pytestmark = pytest.mark.inference

# Tolerance of the property tests. They run in float64, where the folding algebra is exact up to
# ~1e-15 relative; a wrong fold (a missed branch, a padding off by one, a BN on the wrong side) is an
# O(1) error. 1e-9 of the output's largest magnitude separates the two by six orders either way.
REL64 = 1e-9


def randomize_bn(module, gen):
    """Give every BatchNorm random statistics and affine parameters, as after training."""
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=gen, dtype=m.running_mean.dtype) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=gen, dtype=m.running_var.dtype) * 2 + 0.1)
            m.weight.copy_(torch.randn(c, generator=gen, dtype=m.weight.dtype))
            m.bias.copy_(torch.randn(c, generator=gen, dtype=m.bias.dtype))
        for name, p in m.named_parameters(recurse=False):
            if "layer_scale" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
        if isinstance(m, torch.nn.Conv2d) and m.bias is not None:
            m.bias.copy_(torch.randn(m.bias.shape, generator=gen, dtype=m.bias.dtype) * 0.1)
    return module


def assert_fuses_exactly(block, x, seed, rel=REL64):
    gen = torch.Generator().manual_seed(seed)
    block = randomize_bn(block.double(), gen).eval()
    x = x.double()
    before = block(x)
    R.reparameterize(block)
    assert all(m.is_fused for m in block.modules() if isinstance(m, R.Reparameterizable))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in block.modules()), "a BatchNorm survived"
    after = block(x)
    assert before.shape == after.shape
    assert before.abs().max() > 1e-3, "the block's output vanished; the check would prove nothing"
    assert (after - before).abs().max() <= rel * before.abs().max()


channels = st.integers(1, 6)
sides = st.integers(5, 17)
seeds = st.integers(0, 2**31 - 1)


@settings(deadline=None, max_examples=40)
@given(groups=channels, per_group_in=st.integers(1, 3), per_group_out=st.integers(1, 3),
       kernel=st.sampled_from([1, 3, 5]), stride=st.sampled_from([1, 2]), scale=st.booleans(),
       branches=st.integers(1, 3), se=st.booleans(), act=st.booleans(), side=sides, seed=seeds)
def test_mobileone_block_fuses_exactly(groups, per_group_in, per_group_out, kernel, stride, scale,
                                       branches, se, act, side, seed):
    c_in, c_out = groups * per_group_in, groups * per_group_out
    torch.manual_seed(seed)
    block = R.MobileOneBlock(c_in, c_out, kernel, stride, groups, scale_branch=scale,
                             conv_branches=branches, se_ratio=0.5 if se else None, activation=act)
    x = torch.randn(2, c_in, side, side, generator=torch.Generator().manual_seed(seed))
    assert_fuses_exactly(block, x, seed)


@settings(deadline=None, max_examples=25)
@given(c=channels, mult=st.integers(1, 2), kernel=st.sampled_from([3, 5, 7]), stride=st.sampled_from([1, 2]),
       side=sides, seed=seeds)
def test_large_kernel_conv_fuses_exactly(c, mult, kernel, stride, side, seed):
    torch.manual_seed(seed)
    block = R.LargeKernelConv(c, c * mult, kernel, stride, small_kernel=3)
    assert_fuses_exactly(block, torch.randn(1, c, side, side, generator=torch.Generator().manual_seed(seed)), seed)


@settings(deadline=None, max_examples=25)
@given(c=channels, kernel=st.sampled_from([3, 5, 7]), side=sides, seed=seeds)
def test_repmixer_fuses_exactly(c, kernel, side, seed):
    torch.manual_seed(seed)
    block = R.RepMixer(c, kernel, layer_scale_init=1e-5)
    assert_fuses_exactly(block, torch.randn(2, c, side, side, generator=torch.Generator().manual_seed(seed)), seed)


@settings(deadline=None, max_examples=20)
@given(c=channels, kernel=st.sampled_from([3, 7]), side=sides, seed=seeds)
def test_repcpe_fuses_exactly(c, kernel, side, seed):
    torch.manual_seed(seed)
    block = R.RepCPE(c, kernel)
    torch.nn.init.normal_(block.pe.weight)
    assert_fuses_exactly(block, torch.randn(1, c, side, side, generator=torch.Generator().manual_seed(seed)), seed)


@settings(deadline=None, max_examples=20)
@given(c=channels, hidden=st.integers(1, 12), kernel=st.sampled_from([3, 7]), side=sides, seed=seeds)
def test_convffn_fuses_exactly(c, hidden, kernel, side, seed):
    torch.manual_seed(seed)
    block = R.ConvFFN(c, hidden, kernel)
    assert_fuses_exactly(block, torch.randn(1, c, side, side, generator=torch.Generator().manual_seed(seed)), seed)


def small_config(width=8, depth=1):
    return R.FastViTHDConfig(depths=(depth,) * 5, widths=tuple(width * 2 ** i for i in range(5)),
                             head_dim=width, image_size=128)


@settings(deadline=None, max_examples=8)
@given(width=st.sampled_from([4, 8]), depth=st.integers(1, 2), seed=seeds)
def test_small_encoder_fuses_exactly(width, depth, seed):
    torch.manual_seed(seed)
    model = R.FastViTHD(small_config(width, depth))
    assert_fuses_exactly(model, torch.rand(1, 3, 128, 128), seed)


def test_small_encoder_fuses_in_float32_within_1e5():
    """The same property at the precision inference runs in: 1e-5 of the output's magnitude."""
    torch.manual_seed(0)
    model = randomize_bn(R.FastViTHD(small_config(8, 2)), torch.Generator().manual_seed(0)).eval()
    x = torch.rand(2, 3, 128, 192)
    before = model(x)
    after = model.reparameterize()(x)
    assert model.is_fused and before.std() > 1e-3
    assert (after - before).abs().max() <= 1e-5 * before.abs().max()


# Every field away from the release's value and from the other tests' (kernels told apart from each
# other, stages of different depths, attention before a RepMixer stage, four stages): a block that read a
# neighbouring field or the release's number instead of its own builds another encoder here.
ODD = R.FastViTHDConfig(depths=(2, 1, 1, 3), widths=(8, 16, 32, 64),
                        mixers=("repmixer", "attention", "repmixer", "attention"), mlp_ratio=3.0, head_dim=8,
                        image_size=96, expansion=3, se_ratio=1 / 8, repmixer_kernel=5, ffn_kernel=3,
                        downsample_kernel=9, cpe_kernel=11, layer_scale_init=0.25)


def test_every_config_field_is_read_where_it_belongs():
    """Each FastViTHDConfig field, at a value no release uses, shapes the part of the encoder it names:
    blocks per stage, widths, token mixers, the FFN's width, heads, every kernel size, the final
    expansion and its squeeze-excite, the initial layer scales, the stride and the token count. And the
    unusual kernels still fold exactly."""
    assert all(getattr(ODD, f.name) != getattr(R.FASTVITHD, f.name) for f in fields(R.FastViTHDConfig))
    model = R.FastViTHD(ODD)
    side = (ODD.repmixer_kernel, ODD.ffn_kernel, ODD.downsample_kernel, ODD.cpe_kernel)
    assert len(set(side)) == 4
    for i, (stage, width, mixer) in enumerate(zip(model.stages, ODD.widths, ODD.mixers)):
        assert len(stage.blocks) == ODD.depths[i]
        for block in stage.blocks:
            assert block.convffn.fc1.out_channels == int(width * ODD.mlp_ratio)
            assert block.convffn.local.conv.kernel_size == (ODD.ffn_kernel,) * 2
            if mixer == "attention":
                assert type(block) is R.AttentionBlock and block.token_mixer.heads == width // ODD.head_dim
                scales = [block.layer_scale_1, block.layer_scale_2]
            else:
                assert type(block) is R.RepMixerBlock
                assert block.token_mixer.mixer.convs[0].conv.kernel_size == (ODD.repmixer_kernel,) * 2
                scales = [block.layer_scale, block.token_mixer.layer_scale]
            assert all(torch.all(s == ODD.layer_scale_init) for s in scales)
        if i:
            assert stage.downsample.spatial.large.conv.kernel_size == (ODD.downsample_kernel,) * 2
        assert (mixer == "attention") == isinstance(stage.cpe, R.RepCPE)
        if mixer == "attention":
            assert stage.cpe.pe.kernel_size == (ODD.cpe_kernel,) * 2
    assert model.expand.se.reduce.out_channels == int(ODD.expansion * ODD.widths[-1] * ODD.se_ratio) == 24
    x = torch.rand(1, 3, ODD.image_size, ODD.image_size)
    features, stages = model.eval()(x, return_stages=True)
    assert ODD.stride == 32 and features.shape == (1, ODD.expansion * ODD.widths[-1], 3, 3)
    assert [tuple(s.shape[1:]) for s in stages] == [(w, 96 // f, 96 // f) for w, f in zip(ODD.widths, (4, 8, 16, 32))]
    assert ODD.num_tokens() == R.to_tokens(features).shape[1] == 9
    assert_fuses_exactly(R.FastViTHD(ODD), torch.rand(1, 3, 64, 64), seed=0)     # the smallest side: 2 x 2


@pytest.mark.parametrize("head_dim", [4, 8, 16])
def test_attention_splits_its_channels_into_width_over_head_dim_heads(head_dim):
    """head_dim changes no weight's shape, only how the channels split into heads: MHSA(32, head_dim)
    equals torch's own nn.MultiheadAttention with 32 / head_dim heads on the same weights (qkv without
    bias), on both of its attention paths."""
    torch.manual_seed(head_dim)
    attn = R.MHSA(32, head_dim).double()
    ref = torch.nn.MultiheadAttention(32, 32 // head_dim, batch_first=True, dtype=torch.float64)
    ref.in_proj_weight.copy_(attn.qkv.weight)
    ref.in_proj_bias.zero_()
    ref.out_proj.weight.copy_(attn.proj.weight)
    ref.out_proj.bias.copy_(attn.proj.bias)
    x = torch.randn(2, 32, 3, 5, dtype=torch.float64)
    tokens = R.to_tokens(x)
    expected = ref(tokens, tokens, tokens, need_weights=False)[0]
    assert expected.std() > 0.1
    for use_sdpa in (True, False):
        attn.use_sdpa = use_sdpa
        assert (R.to_tokens(attn(x)) - expected).abs().max() < 1e-12


def test_fused_construction_matches_reparameterized_structure():
    """Building fused directly gives exactly the parameters that reparameterize() leaves."""
    cfg = small_config()
    fused = R.FastViTHD(cfg, fused=True).reparameterize()
    trained = R.FastViTHD(cfg).reparameterize()
    assert {k: v.shape for k, v in fused.state_dict().items()} == {k: v.shape for k, v in trained.state_dict().items()}


# --- shapes, token counts and parameter counts of the released configuration ------------------------

def test_paper_token_table_comes_out_of_the_config():
    table = {side: R.FASTVITHD.num_tokens(side) for side in (256, 512, 768, 1024)}
    assert table == {256: 16, 512: 64, 768: 144, 1024: 256}
    assert R.FASTVITHD.stride == 64 and R.FASTVITHD.out_channels == 3072


@pytest.fixture(scope="module")
def official_encoder():
    """FastViTHD with the official checkpoint's tensors, named as Apple names them, loaded the way
    support/loading.py loads a checkpoint: through the LLaVA layout's names, every tensor accounted for."""
    model = R.FastViTHD(fused=True).eval()
    tensors = synthetic_state_dict(prefix=loading.VISION_PREFIX)
    ours = {loading.LLAVA.ours(k, model.cfg): v for k, v in tensors.items()}
    load_exact(model, {k.removeprefix("vision_tower."): v for k, v in ours.items() if k is not None})
    return model


@settings(deadline=None, max_examples=4)
@given(h=st.integers(1, 5), w=st.integers(1, 5))
def test_output_grid_is_h64_by_w64_with_3072_channels(official_encoder, h, w):
    features, stages = official_encoder(torch.rand(1, 3, 64 * h, 64 * w), return_stages=True)
    assert features.shape == (1, 3072, h, w)
    assert R.to_tokens(features).shape == (1, h * w, 3072)
    strides = [4, 8, 16, 32, 64]
    assert [s.shape[1:] for s in stages] == [
        (c, 64 * h // st_, 64 * w // st_) for c, st_ in zip((96, 192, 384, 768, 1536), strides)]


def test_image_side_not_multiple_of_64_is_refused(official_encoder):
    with pytest.raises(ValueError, match="multiple of 64"):
        official_encoder(torch.rand(1, 3, 100, 128))


def test_parameter_count_of_the_release():
    counts = json.loads((REFERENCE / "param_counts.json").read_text())["0.5b"]
    model = R.FastViTHD(fused=True)
    ours = sum(p.numel() for p in model.parameters())
    head = 3072 * 768  # MobileCLIP's head.proj, in the checkpoint but unused
    assert ours == counts["vision_tower_parameters_excluding_unused_head"] == 122_714_208
    assert ours + head == counts["by_component"]["vision_tower"]["parameters"] == 125_073_504


# --- reference outputs from timm's fastvit_mci3 (tests/make_encoder_fixtures.py) ---------------------

# Elementwise tolerance against timm (tests/tolerance.py). Both run float32 on the same weights and
# differ by summation order only; measured 2026-11-26 on a 2-core AMD EPYC (Zen 4, AVX-512), the
# largest difference was 1.4e-5 x std in the stored form and 1.8e-5 x std folded (and with the speed step).
# 1e-4 relative + 1e-4 x std leaves ~5x room for other CPUs and kernels; a GELU in its tanh form, a
# BatchNorm with the wrong eps or a layer scale off by 1 % is far outside it.
TIMM_RTOL, TIMM_ATOL = 1e-4, 1e-4


def test_matches_timm_reference_at_256_and_1024(official_encoder):
    """The official stored form (ConvFFN BatchNorm applied) at 256 and 1024 px, and the inference form
    (BatchNorm folded) at 256 px, equal timm's `fastvit_mci3`
    elementwise. The folded copy is a deep copy: folding the shared fixture in place would make every
    later check compare the folded form only."""
    ref = load_file(str(FIXTURES / "encoder_reference.safetensors"))
    r256 = ref["features_256"]
    alive = (r256.flatten(2).std(-1) > 1e-3).float().mean()
    assert r256.std() > 0.5 and alive > 0.95, "a collapsed or dead reference would prove nothing"
    assert_close(official_encoder(synthetic_image(256)), r256, TIMM_RTOL, TIMM_ATOL, "stored form, 256 px")
    folded = copy.deepcopy(official_encoder).reparameterize()
    assert not is_folded(official_encoder) and is_folded(folded)
    assert_close(folded(synthetic_image(256)), r256, TIMM_RTOL, TIMM_ATOL, "folded form, 256 px")

    out = official_encoder(synthetic_image(1024))
    assert_close(out[:, ::4], ref["features_1024_every4"], TIMM_RTOL, TIMM_ATOL, "stored form, 1024 px")
    stats = torch.stack([out.mean(), out.std(), out.abs().max()])
    assert ref["features_1024_stats"][1] > 1.0
    assert torch.allclose(stats, ref["features_1024_stats"], rtol=1e-4)


def is_folded(encoder):
    return not any(isinstance(m, torch.nn.BatchNorm2d) for m in encoder.modules())
