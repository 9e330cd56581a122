"""FastViTHD, the hybrid vision encoder of FastVLM (CVPR 2025, Sec. 3.2 and Fig. 2), in plain PyTorch.

Read top to bottom, this file follows the encoder from pixels to visual tokens:

    image (B, 3, H, W)
    -> Stem: three MobileOne conv blocks                      (B,   96, H/4,  W/4)
    -> stage 1: RepMixer blocks                               (B,   96, H/4,  W/4)
    -> Downsample + stage 2: RepMixer blocks                  (B,  192, H/8,  W/8)
    -> Downsample + stage 3: RepMixer blocks                  (B,  384, H/16, W/16)
    -> Downsample + RepCPE + stage 4: attention blocks        (B,  768, H/32, W/32)
    -> Downsample + RepCPE + stage 5: attention blocks        (B, 1536, H/64, W/64)
    -> final expansion conv + squeeze-excite                  (B, 3072, H/64, W/64)
    -> flattened row-major: (H/64)*(W/64) tokens of width 3072 for the projector.

At the released 1024 px that is 16 x 16 = 256 tokens. (The paper's stage table puts stage 1 at /8, one
halving later than the released code's /4; the released code and checkpoints are what is built
here.)

Structural reparameterization (FastViT, Sec. 3.2.1; MobileOne; RepVGG). While training, several
blocks are sums of linear branches: a k x k conv + BatchNorm, a 1 x 1 conv + BatchNorm, a BatchNorm on
the identity, an identity skip. In eval mode each branch is an affine map of its input, and a sum of
convolutions over the same input is one convolution, so every such block folds into a single conv with
a bias. Each block below has both forms: the *training form* (branches) and the *fused form* (one
`fused` conv). `reparameterize()` turns the first into the second in place, on one block or on the
whole encoder; `FastViTHD(config, fused=True)` builds the fused form directly, which is the form the
official checkpoints are stored in (Apple's names for it are `reparam_conv` / `lkb_reparam`;
support/loading.py maps them onto the names used here).

Every `forward` below is the paper's equation in plain PyTorch ops. Faster CPU kernels for some of
them live in support/speedups.py, which swaps modules of a loaded model without changing its parameters.
"""

from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------------
# The configuration: the released model is one named instance; small instances keep the structure.
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FastViTHDConfig:
    """The encoder's shape. Every field is read where its comment says; `layer_scale_init` only sets the
    layer scales a new model starts from (a loaded model's come from its checkpoint, or are folded into
    its RepMixer kernels). `from_dict` refuses keys that are not fields."""

    depths: tuple = (2, 12, 24, 4, 2)        # blocks per stage
    widths: tuple = (96, 192, 384, 768, 1536)  # channels per stage; each downsample doubles them
    mixers: tuple = ("repmixer", "repmixer", "repmixer", "attention", "attention")
    mlp_ratio: float = 4.0                  # ConvFFN hidden width = mlp_ratio * C
    head_dim: int = 32                      # attention heads = C / head_dim
    image_size: int = 1024                  # `mobileclip_l_1024`: the tower's input side
    expansion: int = 2                      # final conv: widths[-1] -> expansion * widths[-1] (3072)
    se_ratio: float = 1 / 16                # squeeze-excite bottleneck: 3072 -> 192 -> 3072
    repmixer_kernel: int = 3
    ffn_kernel: int = 7
    downsample_kernel: int = 7              # large-kernel stride-2 conv between stages
    cpe_kernel: int = 7                     # conditional positional encoding before attention stages
    layer_scale_init: float = 1e-5

    # config.json is user input: each whole-number field's bound (for each entry of a list), far beyond the
    # release; a depth of 10**8 would exhaust the memory before any weight could disagree with it.
    LIMITS = {"depths": 1024, "widths": 2**16, "head_dim": 2**12, "image_size": 4096, "expansion": 64,
              "repmixer_kernel": 31, "ffn_kernel": 31, "downsample_kernel": 31, "cpe_kernel": 31}

    def __post_init__(self):
        for name in ("depths", "widths", "mixers"):
            if not isinstance(getattr(self, name), tuple) or not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty list, one entry per stage")
        if not (len(self.depths) == len(self.widths) == len(self.mixers)):
            raise ValueError("depths, widths and mixers need one entry per stage")
        for f in fields(self):              # "1024" or 0 must not get further
            kind = type(f.default)
            for value in (getattr(self, f.name) if kind is tuple else (getattr(self, f.name),)):
                number = isinstance(value, (int, float)) and not isinstance(value, bool)   # True is an int
                whole = number and isinstance(value, int)
                if kind is float:
                    ok, wanted = number and 0 < value < float("inf"), "a positive finite number"
                elif f.name in self.LIMITS:
                    top = self.LIMITS[f.name]
                    ok, wanted = whole and 0 < value <= top, f"a whole number from 1 to {top:,}"
                else:                       # mixers: checked by name below
                    continue
                if not ok:
                    raise ValueError(f"{f.name} must be {wanted}" + (" in each entry" if kind is tuple else "")
                                     + f", not {value!r}")
        if self.image_size % self.stride:
            raise ValueError(f"image_size {self.image_size} is not a multiple of the encoder's stride {self.stride}")
        for w, m in zip(self.widths, self.mixers):
            if m not in ("repmixer", "attention"):
                raise ValueError(f"unknown token mixer {m!r}: use 'repmixer' or 'attention'")
            if m == "attention" and w % self.head_dim:
                raise ValueError(f"attention width {w} is not a multiple of head_dim {self.head_dim}")

    @classmethod
    def from_dict(cls, d):
        """The fields of a JSON dict (lists become tuples); unknown keys are an error."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown FastViTHD config field {unknown[0]!r}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    @property
    def out_channels(self):
        return self.expansion * self.widths[-1]

    @property
    def stride(self):
        """Total downsampling: /4 from the stem, then /2 before every stage after the first."""
        return 4 * 2 ** (len(self.widths) - 1)

    def num_tokens(self, height=None, width=None):
        height = height or self.image_size
        width = width or height
        return (height // self.stride) * (width // self.stride)


FASTVITHD = FastViTHDConfig()  # the released encoder (`fastvithd` in Apple's mci.py)


# ----------------------------------------------------------------------------------------------------
# Folding algebra: BatchNorm into a conv, and the identity as a conv.
# ----------------------------------------------------------------------------------------------------

def fold_batchnorm(weight, bn):
    """conv(x, W) followed by eval-mode BN equals conv(x, W * g/s) + (b - m * g/s), s = sqrt(var + eps).

    For a BatchNorm on the identity, pass the identity kernel as `weight`.
    """
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)       # (C_out,)
    return weight * scale.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * scale


def identity_kernel(channels, groups, kernel_size, like):
    """The k x k grouped conv that returns its input: 1 at the centre tap of each channel's own input."""
    per_group = channels // groups
    k = torch.zeros(channels, per_group, kernel_size, kernel_size, dtype=like.dtype, device=like.device)
    k[torch.arange(channels), torch.arange(channels) % per_group, kernel_size // 2, kernel_size // 2] = 1
    return k


def pad_kernel(kernel, size):
    """Zero-pad a small centred kernel (1x1, 3x3) to size x size so it can be added to a bigger one."""
    p = (size - kernel.shape[-1]) // 2
    return F.pad(kernel, [p, p, p, p])


class ConvBN(nn.Module):
    """A bias-free conv followed by BatchNorm: one branch of a training-form block."""

    def __init__(self, c_in, c_out, kernel_size, stride=1, groups=1):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, stride, kernel_size // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x):
        return self.bn(self.conv(x))

    def kernel_bias(self):
        return fold_batchnorm(self.conv.weight, self.bn)


def make_fused_conv(c_in, c_out, kernel_size, stride=1, groups=1):
    return nn.Conv2d(c_in, c_out, kernel_size, stride, kernel_size // 2, groups=groups, bias=True)


class Reparameterizable(nn.Module):
    """A block with a training form (branches) and a fused form (one conv named `fused`).

    Subclasses build their branches when not fused, list them in `branch_names`, and give the one
    (kernel, bias) their branches sum to in `branch_kernel_bias()`.
    """

    branch_names = ()

    def __init__(self, c_in, c_out, kernel_size, stride=1, groups=1, fused=False):
        super().__init__()
        self.conv_args = (c_in, c_out, kernel_size, stride, groups)
        if fused:
            self.fused = make_fused_conv(*self.conv_args)

    @property
    def is_fused(self):
        return hasattr(self, "fused")

    def kernel_bias(self):
        """(kernel, bias) of the single conv this block's linear part equals."""
        return (self.fused.weight, self.fused.bias) if self.is_fused else self.branch_kernel_bias()

    @torch.no_grad()
    def reparameterize(self):
        """Replace the branches by the one conv they sum to (eval-mode BatchNorm). Idempotent."""
        if self.is_fused:
            return
        kernel, bias = self.kernel_bias()
        fused = make_fused_conv(*self.conv_args).to(device=kernel.device, dtype=kernel.dtype)
        fused.weight.copy_(kernel)
        fused.bias.copy_(bias)
        for name in self.branch_names:
            delattr(self, name)
        self.fused = fused


# ----------------------------------------------------------------------------------------------------
# Blocks of the figure.
# ----------------------------------------------------------------------------------------------------

class SqueezeExcite(nn.Module):
    """Channel gating: global average -> 1x1 reduce -> ReLU -> 1x1 expand -> sigmoid -> scale input."""

    def __init__(self, channels, ratio):
        super().__init__()
        hidden = max(1, int(channels * ratio))  # 3072 * 1/16 = 192 in the release
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.expand = nn.Conv2d(hidden, channels, 1)

    def forward(self, x):                                       # (B, C, H, W)
        s = x.mean((2, 3), keepdim=True)                        # (B, C, 1, 1)
        s = torch.sigmoid(self.expand(F.relu(self.reduce(s))))
        return x * s


class MobileOneBlock(Reparameterizable):
    """MobileOne conv block (stem, downsampling 1x1, final expansion).

    Training form: act(se( sum_i ConvBN_k(x) + ConvBN_1x1(x) + BN(x) )); the 1x1 'scale' branch
    exists for k > 1 when asked for, the BN 'skip' branch when the block keeps the shape.
    Fused form:    act(se( conv_k(x) + bias )).
    """

    branch_names = ("convs", "scale", "skip")

    def __init__(self, c_in, c_out, kernel_size, stride=1, groups=1, *, scale_branch=True,
                 conv_branches=1, se_ratio=None, activation=True, fused=False):
        super().__init__(c_in, c_out, kernel_size, stride, groups, fused)
        self.se = SqueezeExcite(c_out, se_ratio) if se_ratio else nn.Identity()
        self.act = nn.GELU() if activation else nn.Identity()
        if self.is_fused:
            return
        self.convs = nn.ModuleList(ConvBN(c_in, c_out, kernel_size, stride, groups) for _ in range(conv_branches))
        self.scale = ConvBN(c_in, c_out, 1, stride, groups) if (scale_branch and kernel_size > 1) else None
        self.skip = nn.BatchNorm2d(c_in) if (c_in == c_out and stride == 1) else None

    def forward(self, x):                                       # (B, C_in, H, W) -> (B, C_out, H/s, W/s)
        if self.is_fused:
            y = self.fused(x)
        else:
            y = sum(branch(x) for branch in self.convs)
            if self.scale is not None:
                y = y + self.scale(x)
            if self.skip is not None:
                y = y + self.skip(x)
        return self.act(self.se(y))

    def branch_kernel_bias(self):
        c_out, k, groups = self.conv_args[1], self.conv_args[2], self.conv_args[4]
        kernel = self.convs[0].conv.weight.new_zeros(self.convs[0].conv.weight.shape) if self.convs else None
        if kernel is None:  # a skip-only block (no conv branch)
            kernel = self.skip.weight.new_zeros(c_out, c_out // groups, k, k)
        bias = kernel.new_zeros(c_out)
        for branch in self.convs:
            w, b = branch.kernel_bias()
            kernel, bias = kernel + w, bias + b
        if self.scale is not None:
            w, b = self.scale.kernel_bias()
            kernel, bias = kernel + pad_kernel(w, k), bias + b
        if self.skip is not None:
            w, b = fold_batchnorm(identity_kernel(c_out, groups, k, kernel), self.skip)
            kernel, bias = kernel + w, bias + b
        return kernel, bias


class Stem(nn.Sequential):
    """The stem (Fig. 2, left; Apple's `patch_embed`): /4 in three MobileOne blocks, each ending in GELU.

    (B, 3, H, W) -> 3x3 stride-2 conv -> (B, C, H/2, W/2) -> 3x3 stride-2 depthwise -> (B, C, H/4, W/4)
    -> 1x1 conv -> (B, C, H/4, W/4). The released stem has no 1x1 scale branches.
    """

    def __init__(self, channels, fused=False):
        super().__init__(
            MobileOneBlock(3, channels, 3, stride=2, scale_branch=False, fused=fused),
            MobileOneBlock(channels, channels, 3, stride=2, groups=channels, scale_branch=False, fused=fused),
            MobileOneBlock(channels, channels, 1, scale_branch=False, fused=fused),
        )


class LargeKernelConv(Reparameterizable):
    """RepLKNet-style large-kernel grouped conv that downsamples between stages (FastViT Sec. 3.2.3).

    Training form: GELU( ConvBN_7x7(x) + ConvBN_3x3(x) ), both stride 2; fused: GELU( conv_7x7(x) + b ).
    Grouped with groups = C_in and C_out = 2 C_in, so each input channel feeds two output channels.
    """

    branch_names = ("large", "small")

    def __init__(self, c_in, c_out, kernel_size, stride, small_kernel=3, fused=False):
        super().__init__(c_in, c_out, kernel_size, stride, c_in, fused)
        self.act = nn.GELU()
        if self.is_fused:
            return
        self.large = ConvBN(c_in, c_out, kernel_size, stride, groups=c_in)
        self.small = ConvBN(c_in, c_out, small_kernel, stride, groups=c_in)

    def forward(self, x):                                       # (B, C, H, W) -> (B, 2C, H/2, W/2)
        y = self.fused(x) if self.is_fused else self.large(x) + self.small(x)
        return self.act(y)

    def branch_kernel_bias(self):
        w_large, b_large = self.large.kernel_bias()
        w_small, b_small = self.small.kernel_bias()
        return w_large + pad_kernel(w_small, self.conv_args[2]), b_large + b_small


class Downsample(nn.Module):
    """Between stages (Apple's code calls it `PatchEmbed`):
    (B, C, H, W) -> large-kernel stride-2 conv -> (B, 2C, H/2, W/2) -> 1x1 MobileOne -> (B, 2C, H/2, W/2)."""

    def __init__(self, c_in, c_out, kernel_size, fused=False):
        super().__init__()
        self.spatial = LargeKernelConv(c_in, c_out, kernel_size, stride=2, fused=fused)
        self.pointwise = MobileOneBlock(c_out, c_out, 1, fused=fused)

    def forward(self, x):
        return self.pointwise(self.spatial(x))


class RepMixer(Reparameterizable):
    """Token mixing of stages 1-3 (FastViT Sec. 3.2.1, Eq. 1-2).

    Training form:  x + layer_scale * ( mixer(x) - BN(x) ), mixer = depthwise MobileOne block without
    activation (3x3 ConvBN + 1x1 ConvBN + BN skip). Every term is a depthwise linear map of x, so
    the fused form is a single depthwise conv: K = I + ls * (K_mixer - K_bn), b = ls * (b_mixer - b_bn).
    The skip connection disappears into the kernel: at inference the block is *one* 3x3 depthwise conv.
    """

    branch_names = ("norm", "mixer", "layer_scale")

    def __init__(self, dim, kernel_size, layer_scale_init, fused=False):
        super().__init__(dim, dim, kernel_size, 1, dim, fused)
        if self.is_fused:
            return
        self.norm = nn.BatchNorm2d(dim)
        self.mixer = MobileOneBlock(dim, dim, kernel_size, groups=dim, activation=False)
        self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), layer_scale_init))

    def forward(self, x):                                       # (B, C, H, W) -> (B, C, H, W)
        if self.is_fused:
            return self.fused(x)
        return x + self.layer_scale * (self.mixer(x) - self.norm(x))

    def branch_kernel_bias(self):
        dim, k = self.conv_args[0], self.conv_args[2]
        w_mix, b_mix = self.mixer.kernel_bias()
        eye = identity_kernel(dim, dim, k, w_mix)
        w_norm, b_norm = fold_batchnorm(eye, self.norm)
        ls = self.layer_scale                                   # (C, 1, 1)
        return eye + ls.unsqueeze(-1) * (w_mix - w_norm), ls.flatten() * (b_mix - b_norm)


class RepCPE(Reparameterizable):
    """Conditional positional encoding (Chu et al.; FastViT Sec. 3.2.2): x + depthwise_conv_7x7(x).

    Placed before each attention stage, it gives attention a position signal that works at any
    resolution. The residual folds into the kernel's centre tap in the fused form.
    """

    branch_names = ("pe",)

    def __init__(self, dim, kernel_size, fused=False):
        super().__init__(dim, dim, kernel_size, 1, dim, fused)
        if self.is_fused:
            return
        self.pe = make_fused_conv(*self.conv_args)

    def forward(self, x):                                       # (B, C, H, W) -> (B, C, H, W)
        return self.fused(x) if self.is_fused else x + self.pe(x)

    def branch_kernel_bias(self):
        dim, k = self.conv_args[0], self.conv_args[2]
        return self.pe.weight + identity_kernel(dim, dim, k, self.pe.weight), self.pe.bias


class ConvFFN(Reparameterizable):
    """Convolutional feed-forward (FastViT Sec. 3.2.3): depthwise 7x7 conv + BN, 1x1 to 4C, GELU, 1x1 to C.

    The depthwise conv gives the FFN a local receptive field. The official checkpoints keep its
    BatchNorm (that is the form `fused=True` builds); `reparameterize()` folds it into the conv.
    """

    branch_names = ("local",)

    def __init__(self, dim, hidden, kernel_size):
        super().__init__(dim, dim, kernel_size, 1, dim)
        self.local = ConvBN(dim, dim, kernel_size, groups=dim)
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x):                                       # (B, C, H, W)
        x = self.fused(x) if self.is_fused else self.local(x)   # (B, C, H, W), 7x7 depthwise
        return self.fc2(self.act(self.fc1(x)))                  # (B, 4C, H, W) -> (B, C, H, W)

    def branch_kernel_bias(self):
        return self.local.kernel_bias()


class RepMixerBlock(nn.Module):
    """Stages 1-3 (Fig. 2, 'RepMixer'): Y = RepMixer(X); Z = Y + layer_scale * ConvFFN(Y)."""

    def __init__(self, dim, cfg, fused=False):
        super().__init__()
        self.token_mixer = RepMixer(dim, cfg.repmixer_kernel, cfg.layer_scale_init, fused=fused)
        self.convffn = ConvFFN(dim, int(dim * cfg.mlp_ratio), cfg.ffn_kernel)
        self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), cfg.layer_scale_init))

    def forward(self, x):                                       # (B, C, H, W) -> (B, C, H, W)
        y = self.token_mixer(x)
        return y + self.layer_scale * self.convffn(y)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map, i.e. per pixel, as a token would be normalised."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x):                                       # (B, C, H, W)
        x = x.permute(0, 2, 3, 1)                               # (B, H, W, C): normalise the last dim
        x = F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class MHSA(nn.Module):
    """Multi-head self-attention over all H*W positions of a stage-4/5 map (no bias on qkv)."""

    use_sdpa = True  # False runs the plain softmax(q k^T / sqrt(d)) v below, for reading and checking

    def __init__(self, dim, head_dim):
        super().__init__()
        self.heads, self.head_dim = dim // head_dim, head_dim
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):                                       # (B, C, H, W)
        B, C, H, W = x.shape
        tokens = to_tokens(x)                                   # (B, N, C), N = H*W
        qkv = self.qkv(tokens).reshape(B, H * W, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                    # each (B, heads, N, head_dim)
        if self.use_sdpa:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q * self.head_dim ** -0.5) @ k.transpose(-2, -1)   # (B, heads, N, N)
            out = attn.softmax(-1) @ v
        out = self.proj(out.transpose(1, 2).reshape(B, H * W, C))      # (B, N, C)
        return out.reshape(B, H, W, C).permute(0, 3, 1, 2)             # (B, C, H, W)


class AttentionBlock(nn.Module):
    """Stages 4-5 (Fig. 2, 'Self-Attention'): Y = X + ls1 * MHSA(LN(X)); Z = Y + ls2 * ConvFFN(Y)."""

    def __init__(self, dim, cfg):
        super().__init__()
        self.norm = ChannelLayerNorm(dim)
        self.token_mixer = MHSA(dim, cfg.head_dim)
        self.convffn = ConvFFN(dim, int(dim * cfg.mlp_ratio), cfg.ffn_kernel)
        self.layer_scale_1 = nn.Parameter(torch.full((dim, 1, 1), cfg.layer_scale_init))
        self.layer_scale_2 = nn.Parameter(torch.full((dim, 1, 1), cfg.layer_scale_init))

    def forward(self, x):                                       # (B, C, H, W) -> (B, C, H, W)
        y = x + self.layer_scale_1 * self.token_mixer(self.norm(x))
        return y + self.layer_scale_2 * self.convffn(y)


class Stage(nn.Module):
    """One column of Fig. 2: [Downsample] -> [RepCPE, attention stages only] -> blocks."""

    def __init__(self, index, cfg, fused=False):
        super().__init__()
        dim = cfg.widths[index]
        self.downsample = (Downsample(cfg.widths[index - 1], dim, cfg.downsample_kernel, fused)
                           if index > 0 else nn.Identity())
        attention = cfg.mixers[index] == "attention"
        self.cpe = RepCPE(dim, cfg.cpe_kernel, fused) if attention else nn.Identity()
        self.blocks = nn.Sequential(*(
            AttentionBlock(dim, cfg) if attention else RepMixerBlock(dim, cfg, fused)
            for _ in range(cfg.depths[index])))

    def forward(self, x):
        return self.blocks(self.cpe(self.downsample(x)))


class FastViTHD(nn.Module):
    """The encoder: image (B, 3, H, W) in [0, 1] -> feature map (B, 3072, H/64, W/64).

    H and W must be multiples of the total stride (64); the released model is trained at 1024.
    """

    def __init__(self, cfg=FASTVITHD, fused=False):
        super().__init__()
        self.cfg = cfg
        self.stem = Stem(cfg.widths[0], fused)
        self.stages = nn.ModuleList(Stage(i, cfg, fused) for i in range(len(cfg.depths)))
        # Final expansion: grouped 3x3 conv doubling the channels, squeeze-excite, GELU (-> 3072).
        c_last = cfg.widths[-1]
        self.expand = MobileOneBlock(c_last, cfg.out_channels, 3, groups=c_last,
                                     se_ratio=cfg.se_ratio, fused=fused)

    def forward(self, images, return_stages=False):
        s = self.cfg.stride
        if images.shape[-1] % s or images.shape[-2] % s:
            raise ValueError(f"image side {tuple(images.shape[-2:])} must be a multiple of {s}")
        x = self.stem(images)                                   # (B, 96, H/4, W/4)
        stages = []
        for stage in self.stages:                               # /4, /8, /16, /32, /64
            x = stage(x)
            stages.append(x)
        x = self.expand(x)                                      # (B, 3072, H/64, W/64)
        return (x, stages) if return_stages else x

    def reparameterize(self):
        """Fuse every reparameterizable block in place, the ConvFFN BatchNorms included (eval-mode
        semantics: BatchNorm uses its running statistics). The form to run inference in."""
        reparameterize(self)
        return self

    @property
    def is_fused(self):
        return all(m.is_fused for m in self.modules() if isinstance(m, Reparameterizable))


def reparameterize(module):
    """Fuse `module` and every reparameterizable block inside it. Idempotent."""
    for m in list(module.modules()):
        if isinstance(m, Reparameterizable):
            m.reparameterize()
    return module


def to_tokens(features):
    """(B, C, h, w) feature map -> (B, h*w, C) tokens, row-major, as attention and the projector expect."""
    B, C, h, w = features.shape
    return features.permute(0, 2, 3, 1).reshape(B, h * w, C)
