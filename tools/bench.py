"""Benchmarks: the paper's efficiency analysis re-measured on the machine at hand. Timings live here,
never in tests. Random weights at the real shapes (tools/synthetic.py), no download.

    python tools/bench.py reparam     FastViTHD training form vs fused form (1024 px)
    python tools/bench.py encoder     FastViTHD vs ViT-L/14 at 256-1024 px: latency, FLOPs, tokens (+ plot)
    python tools/bench.py decoder     Qwen2-0.5B shapes: prefill 300 tokens and decode, vs transformers' Qwen2
    python tools/bench.py ttft        FastVLM-0.5B at 1024 px: TTFT broken down, decode, follow-up turn, vs
                                      transformers' FastVlmForConditionalGeneration when it (and timm) is installed
    python tools/bench.py breakdown   where the time goes: every block of the encoder and of the prefill, its
                                      FLOPs and GFLOP/s against the matmul probe
    python tools/bench.py probe       the machine's ceiling: fp32 and bf16 matmul GFLOP/s, read bandwidth
    python tools/bench.py precision   float32, bfloat16 and int8 weights: TTFT and decode against the probes, the
                                      plain model files and transformers' FastVLM in the same dtype; load memory
    python tools/bench.py threads     decode speed under OMP_WAIT_POLICY and thread-count settings
    python tools/bench.py batch       infer.py --batch vs one infer.py call per question (50 questions, 10
                                      images, the shipped tiny model): answers per second
    python tools/bench.py serve       serve.py under 1, 8 and 32 concurrent clients: requests/s, TTFT p50/p95,
                                      beside infer.py --batch on the same 50 questions
    python tools/bench.py lora        fine-tuning FastVLM-0.5B's shapes: full vs LoRA (r 128), float32 vs bfloat16:
                                      peak memory and samples/s of train.py, each in a fresh process
    add --quick for tiny shapes and one run (the smoke test does this)

Medians over --runs runs after one warm-up. Every table prints the torch version, thread count and
OpenMP settings it ran under; plots go to --out (default results/).
"""

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]                # the model files, when run as a script

import fastvlm as FV  # noqa: E402
import qwen2 as Q  # noqa: E402
import repmixer as R  # noqa: E402
from support import loading, speedups  # noqa: E402
from support.chat import Chat  # noqa: E402
from support.speedups import synchronize  # noqa: E402


# --quick: FastViTHD's structure at toy widths, so that every section runs in seconds.
QUICK_VISION = R.FastViTHDConfig(depths=(1,) * 5, widths=(8, 16, 32, 64, 128), head_dim=8, image_size=128)


def median_seconds(fn, runs, warmup=1, device=None):
    """Median wall time of fn() over `runs` after `warmup` calls; with a `device`, waiting for it to finish
    its queued work before and after each run (a GPU's calls return before the work is done)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        if device is not None:
            synchronize(device)
        t = time.perf_counter()
        fn()
        if device is not None:
            synchronize(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def gflop(flops):
    """FLOPs as GFLOPs with three significant digits: toy shapes (--quick) are megaFLOPs, not 0.0."""
    return f"{flops / 1e9:.3g}"


def rate_per_s(count, seconds):
    """count / seconds, or None when the interval is too short (or negative: two medians subtracted) to
    time: a decode of a few tokens on a toy model can take less than the timer's noise."""
    return count / seconds if seconds > 1e-4 else None


def shown_rate(rate):
    return "too short to time" if rate is None else f"{rate:.1f}"


QUICK_BANNER = ("--quick: toy shapes and one run per figure, to check that every section runs. Its numbers "
                "are not measurements (a toy model's GFLOPs round to nothing, a few tokens decode faster than "
                "the timer's noise); run without --quick to measure.")


def settings_line():
    return (f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}")


def flops_of(fn):
    with speedups.flop_counter() as counter:
        fn()
    return counter.get_total_flops()


# ----------------------------------------------------------------------------------------------------
# The machine's ceiling.
# ----------------------------------------------------------------------------------------------------

@torch.no_grad()
def probe(args, quiet=False):
    """(fp32 matmul GFLOP/s, bf16 matmul GFLOP/s, read bandwidth GB/s): the machine's limits for compute
    (a 2048 x 2048 product) and for decoding (summing the rows of a 256 MB matrix: every byte read once,
    nothing written back, as a matrix-vector product reads its weights)."""
    n = 512 if args.quick else 2048
    gflops = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        gflops[dtype] = 2 * n ** 3 / median_seconds(lambda: a @ b, 1 if args.quick else 5) / 1e9
    x = torch.randn((8 if args.quick else 64) * 2 ** 20 // 4096, 4096)   # 32 MB .. 256 MB of fp32
    gbps = x.numel() * 4 / median_seconds(lambda: x.sum(dim=1), 1 if args.quick else 5) / 1e9
    if not quiet:
        print(f"machine probe -- {settings_line()}")
        print(f"matmul {n}x{n}: fp32 {gflops[torch.float32]:.1f} GFLOP/s, bf16 {gflops[torch.bfloat16]:.1f} GFLOP/s "
              f"({gflops[torch.bfloat16] / gflops[torch.float32]:.2f}x); read: {gbps:.1f} GB/s")
    return gflops[torch.float32], gflops[torch.bfloat16], gbps


# ----------------------------------------------------------------------------------------------------
# 1. Encoder scaling: FastViTHD vs a plain ViT-L/14.
# ----------------------------------------------------------------------------------------------------

class ViT(nn.Module):
    """A CLIP-style ViT (ViT-L/14 by default): 14x14 patches, pre-norm blocks, one class token."""

    def __init__(self, width=1024, depth=24, heads=16, patch=14, mlp=4096):
        super().__init__()
        self.patch, self.heads = patch, heads
        self.embed = nn.Conv2d(3, width, patch, patch, bias=False)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.pre = nn.LayerNorm(width)
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(
            ln1=nn.LayerNorm(width), qkv=speedups.FastLinear(width, 3 * width), proj=speedups.FastLinear(width, width),
            ln2=nn.LayerNorm(width), fc1=speedups.FastLinear(width, mlp), fc2=speedups.FastLinear(mlp, width)))
            for _ in range(depth))  # the same oneDNN kernels as FastViTHD, so the ratio compares architectures

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)                     # (B, N, width)
        x = self.pre(torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1))
        B, N, C = x.shape                                                 # (no position table: same cost)
        for blk in self.blocks:
            q, k, v = blk.qkv(blk.ln1(x)).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
            x = x + blk.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))
            x = x + blk.fc2(speedups.linear_gelu(blk.ln2(x), blk.fc1))
        return x


@torch.no_grad()
def bench_encoder(args):
    sides = [64, 128] if args.quick else [256, 512, 768, 1024]
    if args.quick:
        fast = R.FastViTHD(QUICK_VISION, fused=True)
        vit = ViT(width=64, depth=2, heads=2)
    else:
        fast, vit = R.FastViTHD(fused=True), ViT()
    speedups.apply(fast.reparameterize().eval()), vit.eval()  # the inference form FastVLM runs
    rows = []
    print(f"encoder scaling, batch 1, fp32 -- {settings_line()}")
    print("| resolution | FastViTHD (s) | ViT-L/14 (s) | ViT / FastViTHD | FastViTHD GFLOPs | ViT-L/14 GFLOPs | tokens FastViTHD / ViT |")
    print("|---|---|---|---|---|---|---|")
    for side in sides:
        x = torch.rand(1, 3, side, side)
        runs = 1 if args.quick else args.runs
        t_fast = median_seconds(lambda: fast(x), runs)
        t_vit = median_seconds(lambda: vit(x), 1 if (args.quick or side >= 768) else runs)
        f_fast, f_vit = flops_of(lambda: fast(x)), flops_of(lambda: vit(x))
        tokens = ((side // 64) ** 2, (side // 14) ** 2)
        rows.append((side, t_fast, t_vit, f_fast, f_vit, tokens))
        print(f"| {side} | {t_fast:.2f} | {t_vit:.2f} | {t_vit / t_fast:.1f}x | {gflop(f_fast)} | "
              f"{gflop(f_vit)} | {tokens[0]} / {tokens[1]} |", flush=True)
    plot_encoder(rows, Path(args.out) / "encoder_scaling.png")
    return rows


def plot_encoder(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    sides = [r[0] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    axes[0].plot(sides, [r[2] for r in rows], "o-", label="ViT-L/14")
    axes[0].plot(sides, [r[1] for r in rows], "o-", label="FastViTHD")
    axes[0].set_ylabel("latency (s), CPU fp32")
    axes[0].set_yscale("log")
    axes[1].plot(sides, [r[5][1] for r in rows], "o-", label="ViT-L/14")
    axes[1].plot(sides, [r[5][0] for r in rows], "o-", label="FastViTHD")
    axes[1].set_ylabel("visual tokens")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("input resolution (px)")
        ax.set_xticks(sides)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"plot: {path}")


# ----------------------------------------------------------------------------------------------------
# 2. The decoder alone: ours vs transformers' Qwen2 on the same weights.
# ----------------------------------------------------------------------------------------------------

def llm_config(quick):
    if quick:
        return Q.Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2)
    return Q.QWEN2_0_5B


@torch.no_grad()
def bench_decoder(args):
    from synthetic import synthetic_llm_tensors

    cfg = llm_config(args.quick)
    tensors = synthetic_llm_tensors(cfg)
    ours = speedups.apply(loading.load_llm(cfg, tensors))
    prompt_len, new = (20, 8) if args.quick else (300, 32)
    ids = torch.randint(0, cfg.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    ref = None if args.no_reference else hf_qwen2(cfg, tensors)
    runs = 1 if args.quick else args.runs

    def our_prefill():
        ours.setup_cache(prompt_len + new)
        return ours(ids, start=0, last_only=True)

    def our_generate():
        ours.setup_cache(prompt_len + new)
        return Q.generate(ours, ids, max_new_tokens=new)

    rows = {}
    for name, prefill, gen in [
        ("ours", our_prefill, our_generate),
        ("transformers", (lambda: ref(ids, logits_to_keep=1)) if ref else None,
         (lambda: ref.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0))
         if ref else None)]:
        if prefill is None:
            continue
        t_prefill = median_seconds(prefill, runs)
        t_gen = median_seconds(gen, runs)
        rows[name] = (t_prefill, rate_per_s(new - 1, t_gen - t_prefill))
    _, _, gbps = probe(args, quiet=True)
    bytes_per_token = sum(p.numel() for p in ours.parameters()) * 4          # every weight read once
    print(f"Qwen2 {'tiny' if args.quick else '0.5B'} shapes, fp32, prefill {prompt_len} tokens, "
          f"decode {new} -- {settings_line()}")
    print("| implementation | prefill (s) | decode tokens/s | decode bandwidth (GB/s) |\n|---|---|---|---|")
    for name, (tp, tps) in rows.items():
        gbps_read = "too short to time" if tps is None else f"{tps * bytes_per_token / 1e9:.3g}"
        print(f"| {name} | {tp:.3f} | {shown_rate(tps)} | {gbps_read} |")
    if "transformers" in rows:
        (a, b), (c, d) = rows["ours"], rows["transformers"]
        speed = f"{b / d:.2f}x" if b and d else "too short to time"
        print(f"ratios: prefill time ours/transformers {a / c:.2f}x, decode speed ours/transformers {speed}; "
              f"read probe {gbps:.1f} GB/s")
    return rows


def hf_qwen2(cfg, tensors):
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("(transformers not installed: no reference)")
        return None
    from synthetic import hf_reference

    return hf_reference(cfg, tensors)


# ----------------------------------------------------------------------------------------------------
# 3. The whole model: TTFT broken down, decode, and a follow-up turn.
# ----------------------------------------------------------------------------------------------------

QUESTION = "Describe the image in detail."
FOLLOW_UP = "What colour is the largest object?"


@torch.no_grad()
def bench_ttft(args):
    import tempfile

    import numpy as np
    from PIL import Image

    from synthetic import LLM_0_5B, SMALL_LLM, write_fastvlm_checkpoint

    folder = Path(tempfile.mkdtemp())
    if args.quick:
        vision = QUICK_VISION
        write_fastvlm_checkpoint(folder, SMALL_LLM, vision, dtype=torch.float32)
    else:
        write_fastvlm_checkpoint(folder, LLM_0_5B, dtype=torch.float32)
    model, tokenizer, config = loading.load_model(folder)
    plain, _, _ = loading.load_model(folder, fast=False)   # the model files alone, no speed step
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8))
    new = 4 if args.quick else 16
    runs = 1 if args.quick else args.runs

    def two_turns(m):
        chat = Chat(m, tokenizer, image, config)
        chat.ask(QUESTION, max_new_tokens=new)
        first = chat.timing
        chat.ask(FOLLOW_UP, max_new_tokens=new)
        return first, chat.timing

    hf_once = hf_fastvlm_ttft(folder, image, new, args.quick)
    timings, plain_timings, hf_runs = [], [], []
    for i in range(runs + 1):                               # ours, plain and transformers' alternate
        timings.append(two_turns(model))
        plain_timings.append(two_turns(plain))
        if hf_once and i > 0:
            hf_runs.append(hf_once())

    def summary(runs_):
        runs_ = runs_[1:]                                   # the first was the warm-up
        med = lambda f: statistics.median(f(t) for t in runs_)  # noqa: E731
        return {"preprocess": med(lambda t: t[0].preprocess), "encoder": med(lambda t: t[0].encoder),
                "projector": med(lambda t: t[0].projector), "prefill": med(lambda t: t[0].prefill),
                "ttft": med(lambda t: t[0].ttft), "tokens": runs_[0][0].prompt_tokens,
                "decode": med(lambda t: (t[0].new_tokens - 1) / t[0].decode if t[0].decode else 0.0),
                "follow_up": med(lambda t: t[1].ttft)}

    ours, plain_ours = summary(timings), summary(plain_timings)
    gflops, _, gbps = probe(args, quiet=True)
    pixels = FV.preprocess(image, model.image_size)[None]
    ids = FV.turn_ids(tokenizer, QUESTION, first=True)
    with speedups.flop_counter() as counter:                  # one encoder pass: its FLOPs and its features
        features = model.vision_tower(pixels)
    enc_flops = counter.get_total_flops()
    embeds = model.embed(ids, model.mm_projector(R.to_tokens(features)))
    prefill_flops = flops_of(lambda: model.llm(embeds=embeds, last_only=True))
    print(f"FastVLM {'tiny' if args.quick else '0.5B'} at {model.image_size} px, fp32, "
          f"{ours['tokens']} prompt tokens -- {settings_line()}")
    use = lambda flops, s: f"{flops / s / 1e9 / gflops:.0%} of the matmul probe"  # noqa: E731
    print("| phase | ours (ms) | machine use | plain model files, no speed step (ms) |\n|---|---|---|---|")
    print(f"| preprocess | {ours['preprocess'] * 1e3:.0f} | | {plain_ours['preprocess'] * 1e3:.0f} |")
    print(f"| vision encoder | {ours['encoder'] * 1e3:.0f} | {use(enc_flops, ours['encoder'])} | "
          f"{plain_ours['encoder'] * 1e3:.0f} |")
    print(f"| projector | {ours['projector'] * 1e3:.1f} | | {plain_ours['projector'] * 1e3:.1f} |")
    print(f"| LLM prefill | {ours['prefill'] * 1e3:.0f} | {use(prefill_flops, ours['prefill'])} | "
          f"{plain_ours['prefill'] * 1e3:.0f} |")
    print(f"| **TTFT** | **{ours['ttft'] * 1e3:.0f}** | | {plain_ours['ttft'] * 1e3:.0f} |")
    print(f"| follow-up turn TTFT | {ours['follow_up'] * 1e3:.0f} | | {plain_ours['follow_up'] * 1e3:.0f} |")
    print(f"| decode tokens/s | {ours['decode']:.1f} | | {plain_ours['decode']:.1f} |")
    bytes_per_token = sum(p.numel() for p in model.llm.parameters()) * 4
    print(f"decode: {ours['decode']:.1f} tokens/s = {ours['decode'] * bytes_per_token / 1e9:.1f} GB/s of weights "
          f"(read probe {gbps:.1f} GB/s); matmul probe {gflops:.1f} GFLOP/s")
    ref = None
    if hf_runs:
        ref = {k: statistics.median(r[k] for r in hf_runs) for k in hf_runs[0]}
        ref["decode"] = rate_per_s(new - 1, ref["decode"])
    if ref:
        print("| phase | transformers (ms) | ours / transformers |\n|---|---|---|")
        for key in ("encoder", "prefill", "ttft", "follow_up"):
            print(f"| {key} | {ref[key] * 1e3:.0f} | {ours[key] / ref[key]:.2f}x |")
        ratio = f"{ours['decode'] / ref['decode']:.2f}x" if ref["decode"] else "too short to time"
        print(f"| decode tokens/s | {shown_rate(ref['decode'])} | {ratio} |")
    return ours, ref


def hf_fastvlm_ttft(folder, image, new, quick, device="cpu", dtype=torch.float32):
    """transformers' FastVlmForConditionalGeneration on the same weights (needs timm), same prompt, on
    `device` in `dtype` (tools/gpu_check.py runs it on a GPU).

    Returns a function that measures it once (or None without timm), so that the caller can
    interleave its runs with ours: on a shared machine, load drifts over minutes.
    """
    try:
        import timm  # noqa: F401
        import transformers
        from transformers import FastVlmConfig, FastVlmForConditionalGeneration
    except ImportError as e:
        print(f"(no transformers FastVLM reference here: {e}; run this in an environment with timm)")
        return None
    if quick:
        print("(--quick: the transformers reference needs the released vision tower; skipped)")
        return None
    from support.checkpoint import read_safetensors
    from synthetic import timm_encoder
    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    except ImportError:                                         # transformers before the PIL/torchvision split
        from transformers import CLIPImageProcessor as CLIPImageProcessorPil

    device = torch.device(device)
    tensors = read_safetensors(folder)
    text = transformers.Qwen2Config(**{k: getattr(Q.QWEN2_0_5B, k) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "rope_theta", "rms_norm_eps", "max_position_embeddings")}, tie_word_embeddings=True)
    config = FastVlmConfig(text_config=text, image_token_index=151646, image_seq_length=256)
    model = FastVlmForConditionalGeneration(config).eval()
    timm_model = timm_encoder({k: v for k, v in tensors.items() if k.startswith(loading.VISION_PREFIX)})
    model.model.vision_tower.timm_model.load_state_dict(timm_model.state_dict(), strict=False)
    model.model.multi_modal_projector.linear_1.load_state_dict(
        {"weight": tensors["model.mm_projector.0.weight"], "bias": tensors["model.mm_projector.0.bias"]})
    model.model.multi_modal_projector.linear_2.load_state_dict(
        {"weight": tensors["model.mm_projector.2.weight"], "bias": tensors["model.mm_projector.2.bias"]})
    model.model.language_model.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items()
                                                if k.startswith("model.") and "vision_tower" not in k
                                                and "mm_projector" not in k})
    model.lm_head.weight = model.model.language_model.embed_tokens.weight
    model.to(device, dtype)
    processor = CLIPImageProcessorPil(crop_size={"height": 1024, "width": 1024}, image_mean=[0.0] * 3,
                                      image_std=[1.0] * 3, size={"shortest_edge": 1024})
    tokenizer = loading.load_tokenizer(folder)

    def prompt_ids(ids):
        at = ids.index(FV.IMAGE_TOKEN_INDEX)
        return torch.tensor([ids[:at] + [151646] * 256 + ids[at + 1:]], device=device)

    def run(ids, tokens):
        t = time.perf_counter()
        pixels = processor(FV.expand_to_square(image), return_tensors="pt")["pixel_values"].to(device, dtype)
        out = model.generate(prompt_ids(ids), pixel_values=pixels, max_new_tokens=tokens, min_new_tokens=tokens,
                             do_sample=False, pad_token_id=151643)
        synchronize(device)
        return time.perf_counter() - t, out

    first = FV.turn_ids(tokenizer, QUESTION, first=True)
    _, out = run(first, new)                                   # (also the warm-up)
    follow_ids = (first + out[0, -new:].tolist() + tokenizer.encode(FV.END)     # the whole chat again
                  + FV.turn_ids(tokenizer, FOLLOW_UP, first=False))
    pixels = processor(FV.expand_to_square(image), return_tensors="pt")["pixel_values"].to(device, dtype)
    embeds = model.model.get_input_embeddings()(prompt_ids(first))

    def one_run():
        """One measurement of every quantity, in seconds (decode as the time of new - 1 tokens)."""
        ttft = run(first, 1)[0]
        return {"ttft": ttft, "decode": run(first, new)[0] - ttft,
                "follow_up": run(follow_ids, 1)[0],
                "encoder": median_seconds(lambda: model.model.get_image_features(pixel_values=pixels), 1, 0, device),
                "prefill": median_seconds(lambda: model.model.language_model(inputs_embeds=embeds), 1, 0, device)}
    return one_run


# ----------------------------------------------------------------------------------------------------
# 4. Precision on the CPU: float32, bfloat16 and int8 weights, against the machine's limits.
# ----------------------------------------------------------------------------------------------------

# name -> (dtype, quantize) of load_model
PRECISIONS = {"float32": (torch.float32, None), "bfloat16": (torch.bfloat16, None), "int8": (torch.bfloat16, "int8")}


def decode_bytes(llm):
    """Bytes one decode step reads: every weight of the decoder once (loading.model_bytes: a tied table
    counts once), except the embedding table, of which it reads one row, unless the output head is that
    same table (tied, not quantized)."""
    table = llm.embed_tokens.weight
    read = loading.model_bytes(llm)
    return read if llm.lm_head.weight is table else read - table[1:].numel() * table.element_size()


def load_peak(folder, dtype, quantize):
    """(peak resident bytes that loading added, the loaded weights' bytes), in a fresh process."""
    code = (f"import sys, torch; sys.path[:0] = [{str(ROOT)!r}]\n"
            "from support import loading\nfrom support.chat import peak_rss_mib\n"
            "before = peak_rss_mib()\n"
            f"m, _, _ = loading.load_model({str(folder)!r}, dtype=torch.{str(dtype).removeprefix('torch.')}, "
            f"quantize={quantize!r})\n"
            "print(int((peak_rss_mib() - before) * 2**20), loading.model_bytes(m))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1200, check=True)
    peak, weights = map(int, out.stdout.split()[-2:])
    return peak, weights


@torch.no_grad()
def bench_precision(args):
    """TTFT (encoder, prefill) and decode speed in float32, bfloat16 and with int8 weights, each against the
    matmul probe of its dtype or the read probe, the plain model files and transformers' FastVLM in the
    same dtype (when timm is installed: see docs/performance.md), and the peak memory of loading."""
    import tempfile

    import numpy as np
    from PIL import Image

    from synthetic import LLM_0_5B, SMALL_LLM, write_fastvlm_checkpoint

    folder = Path(tempfile.mkdtemp()) / "fastvlm-0.5b-random"
    write_fastvlm_checkpoint(folder, SMALL_LLM if args.quick else LLM_0_5B,
                             QUICK_VISION if args.quick else None, dtype=torch.float32)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8))
    new, runs = (4, 1) if args.quick else (32, args.runs)
    gflops32, gflops16, gbps = probe(args)
    units, why = speedups.bf16_units()
    print(f"bf16 units: {units} ({why})\n")
    rows = {}
    for name, (dtype, quantize) in PRECISIONS.items():
        ours, _, config = loading.load_model(folder, dtype=dtype, quantize=quantize)
        tokenizer = loading.load_tokenizer(folder)
        plain = None if quantize else loading.load_model(folder, dtype=dtype, fast=False)[0]
        hf = None if (quantize or args.no_reference) else hf_fastvlm_ttft(folder, image, new, args.quick, dtype=dtype)
        measured = {"ours": [], "plain": [], "transformers": []}
        for i in range(runs + 1):                             # alternating; the first round is the warm-up
            for who, model in (("ours", ours), ("plain", plain)):
                if model is not None:
                    chat = Chat(model, tokenizer, image, config)
                    chat.ask(QUESTION, max_new_tokens=new)
                    t = chat.timing
                    measured[who].append({"encoder": t.encoder, "prefill": t.prefill, "ttft": t.ttft,
                                          "decode": t.decode / max(t.new_tokens - 1, 1), "tokens": t.new_tokens})
            if hf is not None:
                r = hf()
                measured["transformers"].append({**r, "decode": r["decode"] / (new - 1)})
        med = {who: {k: statistics.median(m[k] for m in ms[1:]) for k in ms[0]} for who, ms in measured.items() if ms}
        pixels = FV.preprocess(image, ours.image_size)[None]
        with speedups.flop_counter() as counter:
            ours.vision_tower(pixels.to(dtype))
        enc_flops = counter.get_total_flops()
        peak, weights = load_peak(folder, dtype, quantize)
        rows[name] = {"med": med, "enc_flops": enc_flops, "bytes": decode_bytes(ours.llm), "peak": peak,
                      "weights": weights, "gflops": gflops16 if dtype == torch.bfloat16 else gflops32}
        del ours, plain, hf
    print_precision(rows, gbps, gflops32, gflops16, args)
    plot_precision(rows, Path(args.out) / "precision_cpu.png")
    return rows


def print_precision(rows, gbps, gflops32, gflops16, args):
    print(f"FastVLM {'tiny' if args.quick else '0.5B'} shapes (random weights), 640x480 image, {QUESTION!r} -- "
          f"{settings_line()}")
    print("| precision | TTFT ms | encoder ms (of matmul probe) | prefill ms | decode tokens/s | bytes/token | "
          "GB/s (of read probe) | plain files tokens/s | transformers TTFT ms | transformers tokens/s | "
          "load peak / weights |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        o, p, h = r["med"]["ours"], r["med"].get("plain"), r["med"].get("transformers")
        tps = 1 / o["decode"]
        plain = "" if p is None else f"{1 / p['decode']:.1f}"
        hf_ttft, hf_tps = ("", "") if h is None else (f"{h['ttft'] * 1e3:.0f}", f"{1 / h['decode']:.1f}")
        print(f"| {name} | {o['ttft'] * 1e3:.0f} | {o['encoder'] * 1e3:.0f} "
              f"({r['enc_flops'] / o['encoder'] / 1e9 / r['gflops']:.0%}) | {o['prefill'] * 1e3:.0f} | {tps:.1f} | "
              f"{r['bytes'] / 1e6:.0f} MB | {tps * r['bytes'] / 1e9:.1f} ({tps * r['bytes'] / 1e9 / gbps:.0%}) | "
              f"{plain} | {hf_ttft} | {hf_tps} | {r['peak'] / 2**20:.0f} / {r['weights'] / 2**20:.0f} MiB |")
    f32, b16, i8 = (rows[k]["med"]["ours"] for k in ("float32", "bfloat16", "int8"))
    probe_ratio = gflops16 / gflops32
    print(f"\nbf16 / fp32: TTFT {f32['ttft'] / b16['ttft']:.2f}x faster (matmul probe {probe_ratio:.2f}x: "
          f"{f32['ttft'] / b16['ttft'] / probe_ratio:.0%} of it); decode {f32['decode'] / b16['decode']:.2f}x")
    print(f"int8 / bf16 decode: {b16['decode'] / i8['decode']:.2f}x faster; read probe {gbps:.1f} GB/s")
    for name in ("float32", "bfloat16"):
        h = rows[name]["med"].get("transformers")
        if h:
            o = rows[name]["med"]["ours"]
            print(f"{name} ours / transformers: TTFT {o['ttft'] / h['ttft']:.2f}x (encoder {o['encoder'] / h['encoder']:.2f}x, "
                  f"prefill {o['prefill'] / h['prefill']:.2f}x); decode speed {h['decode'] / o['decode']:.2f}x")


def plot_precision(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((left, "ttft", "time to first token (s)"), (right, "decode", "decode (tokens/s)")):
        for offset, who in ((-0.2, "ours"), (0.2, "transformers")):
            values = [rows[n]["med"][who][key] if who in rows[n]["med"] else float("nan") for n in names]
            values = [1 / v if key == "decode" else v for v in values]
            ax.bar([i + offset for i in range(len(names))], values, width=0.4, label=who)
        ax.set_xticks(range(len(names)), names)
        ax.set_ylabel(label)
        ax.set_title(label.split(" (")[0] + ", FastVLM-0.5B shapes, CPU")
    left.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    print(f"plot: {path}")


# ----------------------------------------------------------------------------------------------------
# Threads and OpenMP's wait policy.
# ----------------------------------------------------------------------------------------------------

def bench_threads(args):
    """Decode speed of the 0.5B decoder in fresh processes under each setting (they must be set
    before torch starts)."""
    print("decode tokens/s of the Qwen2-0.5B decoder (fresh process per setting)")
    print("| threads | OMP_WAIT_POLICY | tokens/s |\n|---|---|---|")
    for threads in (1, 2):
        for policy in ("(unset)", "PASSIVE"):
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            env.pop("OMP_WAIT_POLICY", None)
            if policy != "(unset)":
                env["OMP_WAIT_POLICY"] = policy
            cmd = [sys.executable, str(ROOT / "tools" / "bench.py"), "decoder", "--runs", "1", "--no-reference"] + (
                ["--quick"] if args.quick else [])
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200).stdout
            line = next((l for l in out.splitlines() if l.startswith("| ours")), "| ours | ? | ? |")
            print(f"| {threads} | {policy} | {line.split('|')[3].strip()} |", flush=True)


def bench_reparam(args):
    """The reparameterization claim: the fused encoder computes the same function, faster.

    Four forms, measured in rotation (one run of each, repeated) so that load drifting on a shared
    machine hits them alike: the training form and the fused form, each with plain PyTorch ops (what a
    training step runs) and with the speed step of speedups.py; the last row, fused + ConvFFN
    BatchNorm folded + the speed step (channels-last, oneDNN post-ops), is what inference runs.
    """
    import copy

    cfg = QUICK_VISION if args.quick else R.FASTVITHD
    side = cfg.image_size
    torch.manual_seed(0)
    training = R.FastViTHD(cfg).eval()
    fused = copy.deepcopy(training).reparameterize()
    forms = [("training (branches), plain ops", training),
             ("training (branches), speed step", speedups.apply(copy.deepcopy(training))),
             ("fused (reparameterized, BN folded), plain ops", fused),
             ("inference: fused + BN folded + speed step (channels-last, oneDNN post-ops)",
              speedups.apply(copy.deepcopy(fused)))]
    x = torch.rand(1, 3, side, side)

    def run(model):
        t = time.perf_counter()
        out = model(x)
        return time.perf_counter() - t, out

    runs = 1 if args.quick else args.runs
    times = {name: [] for name, _ in forms}
    with torch.no_grad():
        reference = run(training)[1]
        errors = {name: ((run(m)[1] - reference).abs().max() / reference.abs().max()).item()
                  for name, m in forms}                         # (also the warm-up)
        for _ in range(runs):
            for name, model in forms:
                times[name].append(run(model)[0])
    t = {name: statistics.median(v) for name, v in times.items()}
    base = t[forms[0][0]]
    print(f"FastViTHD at {side}px, batch 1, fp32, medians of {runs} rotations -- {settings_line()}")
    print("| form | latency (s) | speed-up | max relative difference |\n|---|---|---|---|")
    for name, *_ in forms:
        print(f"| {name} | {t[name]:.2f} | {base / t[name]:.2f}x | {errors[name]:.1e} |")
    names = [f[0] for f in forms]
    print(f"reparameterization alone: {t[names[0]] / t[names[2]]:.2f}x with plain ops, "
          f"{t[names[1]] / t[names[3]]:.2f}x with the speed step; "
          f"training form as trained -> inference form as run: {base / t[names[3]]:.2f}x")
    return t


# ----------------------------------------------------------------------------------------------------
# 4. Where the time goes: every block of the encoder and the decoder against the machine's ceiling.
# ----------------------------------------------------------------------------------------------------

class BlockTimer:
    """Exclusive time and FLOPs per labelled module, through forward hooks.

    A labelled module's row gets its own time only: the time of labelled modules called inside it goes
    to theirs (so MHSA's row is its attention core, its qkv/proj linears have their own). FLOPs come
    from a second pass under speedups.flop_counter().
    """

    def __init__(self, labels):                                 # {module: row label}
        self.time, self.flops = {}, {}
        self.counter, self.stack = None, []
        self.handles = []
        for module, label in labels.items():
            self.time.setdefault(label, 0.0)
            self.flops.setdefault(label, 0)
            self.handles.append(module.register_forward_pre_hook(lambda *_: self._enter()))
            self.handles.append(module.register_forward_hook(lambda *_, label=label: self._exit(label)))

    def _now(self):
        return time.perf_counter(), self.counter.get_total_flops() if self.counter else 0

    def _enter(self):
        self.stack.append([*self._now(), 0.0, 0])              # start time, start FLOPs, children's

    def _exit(self, label):
        t0, f0, child_t, child_f = self.stack.pop()
        t, f = self._now()
        self.time[label] += t - t0 - child_t
        self.flops[label] += f - f0 - child_f
        if self.stack:
            self.stack[-1][2] += t - t0
            self.stack[-1][3] += f - f0

    def measure(self, fn, runs):
        """Mean seconds of fn() per row (and 'other' for what no row covers), FLOPs per row."""
        fn()                                                    # warm-up
        self.time = dict.fromkeys(self.time, 0.0)
        total = 0.0
        for _ in range(runs):
            t = time.perf_counter()
            fn()
            total += time.perf_counter() - t
        seconds = {k: v / runs for k, v in self.time.items()}
        seconds["other (residual adds, reshapes, Python)"] = total / runs - sum(seconds.values())
        with speedups.flop_counter() as self.counter:
            fn()
        self.counter = None
        for h in self.handles:
            h.remove()
        return seconds, dict(self.flops), total / runs


def encoder_rows(model):
    """The encoder's blocks, grouped by the kernel they run on (their efficiency differs by kind)."""
    depthwise = "depthwise convs (RepMixer 3x3, ConvFFN 7x7, RepCPE 7x7)"
    labels = {model.stem: "stem (3x3 s2 conv, 3x3 s2 depthwise, 1x1)",
              model.expand: "final expansion (3x3 grouped + SE)"}
    for i, stage in enumerate(model.stages, start=1):
        if isinstance(stage.downsample, R.Downsample):
            labels[stage.downsample] = "downsampling (7x7 s2 grouped conv + 1x1)"
        if isinstance(stage.cpe, R.RepCPE):
            labels[stage.cpe] = depthwise
        for block in stage.blocks:
            ffn = block.convffn
            labels[ffn.fused if ffn.is_fused else ffn.local] = depthwise
            c, hidden = ffn.fc1.in_channels, ffn.fc1.out_channels
            # the block too: with the speed step its forward runs the 1x1 convs itself (speedups.py),
            # so its own time is those convs and the residual adds
            labels[block] = labels[ffn] = f"ConvFFN 1x1 convs, stage {i} ({c} -> {hidden} -> {c})"
            if isinstance(block, R.RepMixerBlock):
                labels[block.token_mixer] = depthwise
            else:
                labels[block.norm] = "attention: channel LayerNorm"
                labels[block.token_mixer.qkv] = labels[block.token_mixer.proj] = "attention: qkv and proj linears"
                labels[block.token_mixer] = "attention: softmax(q k^T) v (SDPA)"
    return labels


def decoder_rows(model):
    labels = {model.lm_head: "LLM lm_head (last position only)", model.norm: "LLM RMSNorm"}
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        labels[layer.input_layernorm] = labels[layer.post_attention_layernorm] = "LLM RMSNorm"
        for linear in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
            labels[linear] = "LLM attention linears (q, k, v, o)"
        labels[attn] = "LLM attention: RoPE, KV cache, SDPA"
        for linear in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            labels[linear] = "LLM MLP linears (gate, up, down)"
        labels[mlp] = "LLM SwiGLU: silu(gate) * up"
    return labels


def ttft_prompt_tokens(cfg):
    """Length of bench ttft's first prompt: the template and QUESTION (Qwen2's real tokenizer) + the image."""
    import tempfile

    from synthetic import write_official_tokenizer

    with tempfile.TemporaryDirectory() as folder:
        write_official_tokenizer(folder)
        ids = FV.turn_ids(loading.load_tokenizer(folder), QUESTION, first=True)
    return len(ids) - 1 + cfg.num_tokens()                      # <image> stands for the visual tokens


@torch.no_grad()
def bench_breakdown(args):
    """The inference encoder at its image size and the 0.5B decoder's prefill of the TTFT prompt,
    block by block: time, FLOPs and GFLOP/s against the matmul probe. The last line is the floor:
    the time if every FLOP ran at the probe's speed."""
    cfg = QUICK_VISION if args.quick else R.FASTVITHD
    torch.manual_seed(0)
    encoder = speedups.apply(R.FastViTHD(cfg).eval().reparameterize())
    image = torch.rand(1, 3, cfg.image_size, cfg.image_size)
    llm = speedups.apply(Q.Qwen2(llm_config(args.quick)).init_weights().eval())
    prompt = ttft_prompt_tokens(cfg)
    embeds = torch.randn(1, prompt, llm.cfg.hidden_size) * 0.02
    llm.setup_cache(prompt)
    runs = 1 if args.quick else args.runs
    gflops, _, _ = probe(args, quiet=True)
    parts = [(f"FastViTHD (inference form) at {cfg.image_size} px", encoder_rows(encoder), lambda: encoder(image)),
             (f"Qwen2 {'tiny' if args.quick else '0.5B'} prefill of {prompt} tokens", decoder_rows(llm),
              lambda: llm(embeds=embeds, last_only=True))]
    print(f"where the time goes, fp32, means of {runs} runs -- {settings_line()}; matmul probe {gflops:.1f} GFLOP/s")
    all_flops = all_seconds = 0
    for title, labels, fn in parts:
        seconds, flops, total = BlockTimer(labels).measure(fn, runs)
        print(f"{title}: {total:.2f} s")
        print("| block | ms | share | GFLOPs | GFLOP/s | of the probe |\n|---|---|---|---|---|---|")
        for label, s in sorted(seconds.items(), key=lambda kv: -kv[1]):
            f = flops.get(label, 0) / 1e9
            rate = f"| {f / s:.3g} | {f / s / gflops:.0%} |" if f else "| | |"
            print(f"| {label} | {s * 1e3:.0f} | {s / total:.1%} | {f:.3g} {rate}")
        f = sum(flops.values()) / 1e9
        print(f"total {f:.3g} GFLOPs at {f / total:.3g} GFLOP/s ({f / total / gflops:.0%} of the probe); "
              f"at the probe's speed throughout: {f / gflops:.2f} s\n")
        all_flops, all_seconds = all_flops + f, all_seconds + total
    print(f"encoder + prefill: {all_flops:.3g} GFLOPs in {all_seconds:.2f} s, {all_flops / all_seconds / gflops:.0%} "
          f"of the probe; floor at the probe's speed {all_flops / gflops:.2f} s")
    return all_flops, all_seconds


def batch_questions(tmp, n_images, per_image):
    """Scenes of tools/shapes_data.py saved in `tmp` and questions about each, as a --batch file there."""
    import json
    import random

    import shapes_data

    rng, rows = random.Random(0), []
    for i in range(n_images):
        objects = shapes_data.random_scene(rng)
        shapes_data.draw_scene(objects, rng).save(tmp / f"scene{i}.png")
        asked = [q for _, q, _ in shapes_data.questions(objects, rng)][:per_image]   # every scene has >= 5
        rows += [{"id": f"{i}-{j}", "image": f"scene{i}.png", "question": q} for j, q in enumerate(asked)]
    (tmp / "questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def bench_serve(args):
    """serve.py under N concurrent clients (the openai package, streaming, temperature 0): requests/s and
    the time to first token each client sees, p50 and p95, queueing included; beside one infer.py --batch
    run on the same 50 questions. Whole processes, the shipped tiny model."""
    import base64
    import json
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    try:
        import openai
    except ImportError:
        print("(serve: the openai package is not installed: pip install -r requirements-dev.txt)")
        return None
    n_images, per_image = (2, 2) if args.quick else (10, 5)
    tmp = Path(tempfile.mkdtemp())
    rows = batch_questions(tmp, n_images, per_image)
    urls = {r["image"]: "data:image/png;base64," + base64.b64encode((tmp / r["image"]).read_bytes()).decode()
            for r in rows}
    print(f"## serve: {len(rows)} questions about {n_images} images, shipped tiny model ({settings_line()})\n")
    start = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "infer.py"), "--batch", str(tmp / "questions.jsonl"), "--out",
                    str(tmp / "answers.jsonl")], check=True, capture_output=True)
    batch_s = time.perf_counter() - start
    expected = [json.loads(line)["answer"] for line in (tmp / "answers.jsonl").read_text().splitlines()]
    server = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--port", "0"], stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while "ready" not in line:
            line = server.stderr.readline()
            if not line and server.poll() is not None:
                raise RuntimeError("serve.py stopped before it was ready")
        url = line.split(" at ")[1].split(" ")[0]

        def one(row):
            client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
            sent, first, text = time.perf_counter(), None, ""
            for chunk in client.chat.completions.create(
                    model="fastvlm-tiny", temperature=0, stream=True, messages=[{"role": "user", "content": [
                        {"type": "text", "text": row["question"]},
                        {"type": "image_url", "image_url": {"url": urls[row["image"]]}}]}]):
                if chunk.choices and chunk.choices[0].delta.content:
                    first = first or time.perf_counter()
                    text += chunk.choices[0].delta.content
            return (first or time.perf_counter()) - sent, text

        print("| clients | wall time | requests/s | TTFT p50 (ms) | TTFT p95 (ms) | answers as --batch's |")
        print("|---|---|---|---|---|---|")
        for clients in ((1, 2) if args.quick else (1, 8, 32)):
            start = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                results = list(pool.map(one, rows))
            wall = time.perf_counter() - start
            ttfts = sorted(t for t, _ in results)
            p = lambda q: ttfts[min(len(ttfts) - 1, int(q * len(ttfts)))] * 1e3       # noqa: E731
            same = sum(text == e for (_, text), e in zip(results, expected))
            print(f"| {clients} | {wall:.1f} s | {len(rows) / wall:.2f} | {p(0.5):.0f} | {p(0.95):.0f} | "
                  f"{same}/{len(rows)} |")
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"| one infer.py --batch (loading included) | {batch_s:.1f} s | {len(rows) / batch_s:.2f} | | | |")


def bench_batch(args):
    """infer.py --batch against one infer.py call per question: 50 questions about 10 images (5 each), the
    shipped tiny model, whole processes timed (loading included)."""
    import json
    import tempfile

    n_images, per_image = (2, 2) if args.quick else (10, 5)
    tmp = Path(tempfile.mkdtemp())
    rows = batch_questions(tmp, n_images, per_image)
    infer_py = [sys.executable, str(ROOT / "infer.py")]
    print(f"## batch: {len(rows)} questions about {n_images} images, shipped tiny model, whole processes "
          f"({settings_line()})\n")
    start = time.perf_counter()
    subprocess.run(infer_py + ["--batch", str(tmp / "questions.jsonl"), "--out", str(tmp / "answers.jsonl")],
                   check=True, capture_output=True)
    batch_s = time.perf_counter() - start
    batch_answers = [json.loads(line)["answer"] for line in (tmp / "answers.jsonl").read_text().splitlines()]
    single_answers, start = [], time.perf_counter()
    for r in rows:
        done = subprocess.run(infer_py + [str(tmp / r["image"]), r["question"]], check=True, capture_output=True,
                              text=True)
        single_answers.append(done.stdout.removesuffix("\n"))
    single_s = time.perf_counter() - start
    assert batch_answers == single_answers, "batch answers differ from the single-question command's"
    print("| mode | wall time | answers/s |\n|---|---|---|")
    print(f"| {len(rows)} separate infer.py calls | {single_s:.1f} s | {len(rows) / single_s:.2f} |")
    print(f"| one infer.py --batch | {batch_s:.1f} s | {len(rows) / batch_s:.2f} |")
    print(f"\nbatch mode: {single_s / batch_s:.1f}x the answers per second, the same {len(rows)} answers")
    return single_s / batch_s


# train.py configurations for `bench.py lora`: stage 2 of the paper in full, and LLaVA-1.5's LoRA recipe
# (adapters of rank 128 on the decoder, projector in full, encoder frozen), each in float32 and bfloat16.
LORA_RUNS = (("full, float32", ["--dtype", "float32"]),
             ("full, bfloat16 autocast", ["--dtype", "bfloat16"]),
             ("LoRA r 128, float32", ["--lora", "128", "--freeze", "vision_tower", "--dtype", "float32"]),
             ("LoRA r 128, bfloat16 base", ["--lora", "128", "--freeze", "vision_tower", "--dtype", "bfloat16"]),
             ("LoRA r 128, bfloat16 base, grad checkpoint",
              ["--lora", "128", "--freeze", "vision_tower", "--dtype", "bfloat16", "--grad-checkpoint"]))


def bench_lora(args):
    """Peak resident memory and samples/s of `train.py --stage 2` on FastVLM-0.5B's shapes (random weights,
    1024 px, batch 1), full and LoRA, float32 and bfloat16: each configuration in a fresh process."""
    import json
    import tempfile

    from synthetic import LLM_0_5B, SMALL_LLM, write_fastvlm_checkpoint

    tmp = Path(tempfile.mkdtemp())
    folder = tmp / "fastvlm-0.5b-random"
    write_fastvlm_checkpoint(folder, SMALL_LLM if args.quick else LLM_0_5B, dtype=torch.bfloat16,
                             vision_cfg=QUICK_VISION if args.quick else None)
    steps = 2 if args.quick else 4
    answer = " ".join(["a red circle and a blue square"] * 6)              # 42 words, about 60 tokens
    records = [{"id": str(i), "image": "shapes.png", "conversations": [
        {"from": "human", "value": "<image>\nDescribe the image in detail."}, {"from": "gpt", "value": answer}]}
        for i in range(steps)]
    (tmp / "data.json").write_text(json.dumps(records))
    (tmp / "images").mkdir()
    (tmp / "images" / "shapes.png").write_bytes((ROOT / "examples" / "shapes.png").read_bytes())
    print(f"## train.py --stage 2 on FastVLM-0.5B's shapes (random weights), batch 1, {steps} steps\n")
    print(settings_line() + (", bf16 units: yes" if speedups.bf16_units() else ", bf16 units: no") + "\n")
    print("| configuration | trained parameters | peak memory | samples/s |\n|---|---|---|---|")
    for name, extra in LORA_RUNS:
        extra = [("8" if args.quick and a == "128" else a) for a in extra]      # the toy layers are 64 wide
        out = tmp / f"run-{len(extra)}-{abs(hash(name))}"
        code = (f"import sys; sys.path[:0] = [{str(ROOT)!r}]; import train\n"
                "from support.chat import peak_rss_mib\n"
                f"rc = train.main({['--stage', '2', '--init', str(folder), '--data', str(tmp / 'data.json'), '--images', str(tmp / 'images'), '--out', str(out), '--batch-size', '1', '--steps', str(steps), '--no-progress', '--max-length', '512'] + extra!r})\n"
                "print('PEAK', peak_rss_mib(), rc)")
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=3600)
        peak = [line.split() for line in run.stdout.splitlines() if line.startswith("PEAK")]
        if run.returncode or not peak or peak[0][2] != "0":
            print(f"| {name} | failed: {(run.stderr.strip().splitlines() or ['?'])[-1]} | | |")
            continue
        trained = next((line.split("training ")[1].split(" of ")[0] for line in run.stderr.splitlines()
                        if "training " in line), "?")
        rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        rate = statistics.median(r["samples_per_s"] for r in rows[1:] or rows)    # after the first step
        print(f"| {name} | {trained} | {float(peak[0][1]) / 1024:.1f} GiB | {rate:.2f} |", flush=True)
        import shutil
        shutil.rmtree(out, ignore_errors=True)
    import shutil
    shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["reparam", "encoder", "decoder", "ttft", "breakdown", "probe", "threads", "batch",
                                    "precision", "serve", "lora", "all"])
    p.add_argument("--quick", action="store_true", help="tiny shapes, one run: checks the script runs")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "results"))
    p.add_argument("--no-reference", action="store_true", help="skip the transformers comparisons")
    args = p.parse_args(argv)
    jobs = {"probe": probe, "reparam": bench_reparam, "encoder": bench_encoder, "decoder": bench_decoder,
            "ttft": bench_ttft, "breakdown": bench_breakdown, "threads": bench_threads, "batch": bench_batch,
            "precision": bench_precision, "serve": bench_serve, "lora": bench_lora}
    if args.quick:
        print(QUICK_BANNER + "\n")
    for name in (jobs if args.what == "all" else [args.what]):
        jobs[name](args)
        print()
    if args.quick:
        print(QUICK_BANNER)
    return 0


if __name__ == "__main__":
    sys.exit(main())
