"""FastVLM on one CUDA GPU, checked and timed in one command: random weights at the 0.5B shape (no
download), against this project on the CPU and transformers' FastVLM on the same GPU.

    python tools/gpu_check.py                          # a few minutes; a table, and results/gpu_check.json
    python tools/gpu_check.py --out /tmp/gpu.json      # the JSON elsewhere
    python tools/gpu_check.py --device cpu --quick     # tiny shapes on the CPU: checks the script itself runs

It runs in order, each part on its own (a part that fails is recorded with its error and the rest go on):

1. **Agreement.** The same image and question through CPU fp32, CUDA fp32 and CUDA bf16: first-step logits
   (largest difference against the CPU's, in units of the CPU logits' spread), the top-1 token, 32 greedy
   tokens, and 32 sampled ones (CUDA graph against eager decoding, fp32, same seed). The 256 pixel
   values as the GPU divides them, against numpy's k / 255.
2. **Time to first token** (bf16, medians of --runs after a warm-up turn): preprocessing, encoder,
   projector, prefill; the follow-up question; decode tokens/s. Ours with the speed step (decode
   replayed as a CUDA graph), ours as the plain model files (eager decode), and transformers'
   FastVlmForConditionalGeneration when transformers and timm are importable.
3. **Decode against the memory wall**: the weight bytes one token reads, the GPU's copy bandwidth, and
   the fraction of that limit each decoder reaches.
4. **The encoder's memory layout**: NCHW against channels-last, bf16 (speedups.py keeps NCHW on CUDA
   until this says channels-last is faster).
5. **infer.py as a user runs it**: `--timing` on the first call (start-up apart from steady state, peak
   GPU and host memory) and `--dtype float16` (an overflow must end with exit 2 and a message naming the
   dtype, never with garbage).
6. **train.py**: three steps at the 0.5B shape in bf16 autocast, with and without --grad-checkpoint (peak
   GPU memory, samples/s), and one run through torchrun (the tiny model, one process).

The GPU machines this was written for carry their own torch and no network: it needs nothing beyond
requirements.txt (transformers and timm only for the reference).
"""

import argparse
import copy
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]                # the model files, when run as a script

import bench  # noqa: E402
import fastvlm as FV  # noqa: E402
import qwen2 as Q  # noqa: E402
from support import loading, speedups  # noqa: E402
from support.chat import Chat  # noqa: E402
from synthetic import LLM_0_5B, SMALL_LLM, write_fastvlm_checkpoint  # noqa: E402

QUESTION, FOLLOW_UP = bench.QUESTION, bench.FOLLOW_UP


def prompt_embeds(model, tokenizer, image):
    """The first turn's (1, T, d) input to the LLM, as Chat builds it."""
    pixels = speedups.to_pixels(FV.square_rgb(image, model.image_size), model.llm.device, model.llm.dtype)
    return model.embed(FV.turn_ids(tokenizer, QUESTION, first=True), model.encode_image(pixels))


def decode_ids(model, embeds, new, vocab_limit, temperature=0.0, seed=None):
    """`new` tokens after the prompt, never stopping early (no stop ids). The cache is allocated only when
    too small, so that repeated calls replay one recorded graph instead of recording a new one each."""
    if model.llm.max_len < embeds.shape[1] + new + 1:
        model.llm.setup_cache(embeds.shape[1] + max(new, 256) + 1)
    ids, _ = Q.generate(model.llm, embeds=embeds, max_new_tokens=new, temperature=temperature, seed=seed,
                        vocab_limit=vocab_limit)
    return ids


# ----------------------------------------------------------------------------------------------------
# 1. Agreement.
# ----------------------------------------------------------------------------------------------------

@torch.no_grad()
def agreement(ctx):
    """fp32 on the GPU as fp32: TF32 (on by default for cuDNN's convolutions) is turned off here."""
    device, new = ctx.device, ctx.new_check
    rows = {}
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return compare(ctx, device, new, rows)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


def compare(ctx, device, new, rows):
    """Each configuration's first-step logits, greedy and sampled tokens, against the CPU's fp32."""
    for name, dev, dtype, fast in [("reference: cpu fp32", "cpu", torch.float32, True),
                                   (f"{device.type} fp32", device, torch.float32, True),
                                   (f"{device.type} fp32 plain", device, torch.float32, False),
                                   (f"{device.type} bf16", device, torch.bfloat16, True)]:
        model, tokenizer, _ = loading.load_model(ctx.folder, device=dev, dtype=dtype, fast=fast)
        embeds = prompt_embeds(model, tokenizer, ctx.image)
        logits = model.llm(embeds=embeds, last_only=True)[0, -1, :len(tokenizer)].float().cpu()
        greedy = decode_ids(model, embeds, new, len(tokenizer))
        sampled = decode_ids(model, embeds, new, len(tokenizer), temperature=0.8, seed=7)
        rows[name] = {"logits": logits, "greedy": greedy, "sampled": sampled, "decoder": type(model.llm).__name__,
                      "graphs": sorted(map(str, getattr(model.llm, "_graphs", {}))),
                      "graphs_failed": getattr(model.llm, "devices", None) == ()}
        del model
    ref = rows["reference: cpu fp32"]
    out = {}
    for name, r in rows.items():
        diff = (r["logits"] - ref["logits"]).abs().max().item() / ref["logits"].std().item()
        same = next((i for i, (a, b) in enumerate(zip(r["greedy"], ref["greedy"])) if a != b), len(ref["greedy"]))
        out[name] = {"decoder": r["decoder"], "graphs": r["graphs"], "graphs_failed": r["graphs_failed"],
                     "max_logit_diff_in_std": diff,
                     "top1_equal": int(r["logits"].argmax()) == int(ref["logits"].argmax()),
                     "greedy_equal_prefix": same, "greedy_tokens": len(ref["greedy"]), "greedy": r["greedy"]}
    fast, plain = rows[f"{device.type} fp32"], rows[f"{device.type} fp32 plain"]
    out["graph_vs_eager_fp32"] = {"greedy_identical": fast["greedy"] == plain["greedy"],
                                  "sampled_identical": fast["sampled"] == plain["sampled"],
                                  "logit_spread": ref["logits"].std().item()}
    rgb = torch.arange(256, dtype=torch.uint8).repeat_interleave(3).reshape(16, 16, 3)
    pixels = speedups.to_pixels(rgb, device).cpu()[0, 0].numpy()
    out["pixels_exact"] = bool(np.array_equal(pixels, np.arange(256, dtype=np.float32).reshape(16, 16)
                                              / np.float32(255.0)))
    return out


# ----------------------------------------------------------------------------------------------------
# 2-4. Time to first token, decode, the memory wall, the encoder's layout.
# ----------------------------------------------------------------------------------------------------

@torch.no_grad()
def time_ours(ctx, fast):
    device, dtype = ctx.device, ctx.dtype
    model, tokenizer, config = loading.load_model(ctx.folder, device=device, dtype=dtype, fast=fast)
    chat = Chat(model, tokenizer, ctx.image, config)
    startup = speedups.warm_up(chat, QUESTION, 8)
    turns = []
    for _ in range(ctx.runs):
        chat = Chat(model, tokenizer, ctx.image, config)
        chat.ask(QUESTION, max_new_tokens=8)
        first = chat.timing
        chat.ask(FOLLOW_UP, max_new_tokens=8)
        turns.append((first, chat.timing.ttft))
    med = lambda f: statistics.median(f(t) for t in turns)  # noqa: E731
    embeds = prompt_embeds(model, tokenizer, ctx.image)
    one = bench.median_seconds(lambda: decode_ids(model, embeds, 1, len(tokenizer)), ctx.runs, device=device)
    many = bench.median_seconds(lambda: decode_ids(model, embeds, ctx.new, len(tokenizer)), ctx.runs, device=device)
    out = {"startup_ms": startup * 1e3, "preprocess_ms": med(lambda t: t[0].preprocess) * 1e3,
           "encoder_ms": med(lambda t: t[0].encoder) * 1e3, "projector_ms": med(lambda t: t[0].projector) * 1e3,
           "prefill_ms": med(lambda t: t[0].prefill) * 1e3, "ttft_ms": med(lambda t: t[0].ttft) * 1e3,
           "prompt_tokens": turns[0][0].prompt_tokens, "follow_up_ms": med(lambda t: t[1]) * 1e3,
           "decode_tokens_per_s": (ctx.new - 1) / (many - one),
           "weight_bytes_per_token": bench.decode_bytes(model.llm),
           "graphs": sorted(map(str, getattr(model.llm, "_graphs", {}))),          # which steps replayed a graph
           "graphs_failed": getattr(model.llm, "devices", None) == ()}
    if fast:
        out["encoder_layouts"] = encoder_layouts(model, tokenizer, ctx)
    return out


def encoder_layouts(model, tokenizer, ctx):
    """The encoder alone on the same pixels, NCHW (its weights as loaded) against channels-last."""
    pixels = speedups.to_pixels(FV.square_rgb(ctx.image, model.image_size), ctx.device, model.llm.dtype)
    nchw = bench.median_seconds(lambda: model.vision_tower(pixels), ctx.runs, device=ctx.device)
    last = copy.deepcopy(model.vision_tower).to(memory_format=torch.channels_last)
    cl_pixels = pixels.contiguous(memory_format=torch.channels_last)
    cl = bench.median_seconds(lambda: last(cl_pixels), ctx.runs, device=ctx.device)
    return {"nchw_ms": nchw * 1e3, "channels_last_ms": cl * 1e3}


def copy_bandwidth(device):
    """Bytes read plus bytes written per second by a device-to-device copy of 1 GiB (64 MiB with --quick)."""
    n = 2**29 if device.type == "cuda" else 2**25
    x = torch.empty(n, dtype=torch.bfloat16, device=device)
    y = torch.empty_like(x)
    return 2 * x.numel() * x.element_size() / bench.median_seconds(lambda: y.copy_(x), 5, device=device)


def time_transformers(ctx):
    measure = bench.hf_fastvlm_ttft(ctx.folder, ctx.image, ctx.new, ctx.quick, ctx.device, ctx.dtype)
    if measure is None:
        return None
    runs = [measure() for _ in range(ctx.runs)]
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    return {"encoder_ms": med["encoder"] * 1e3, "prefill_ms": med["prefill"] * 1e3, "ttft_ms": med["ttft"] * 1e3,
            "follow_up_ms": med["follow_up"] * 1e3, "decode_tokens_per_s": (ctx.new - 1) / med["decode"]}


# ----------------------------------------------------------------------------------------------------
# 5-6. The command-line tools in subprocesses.
# ----------------------------------------------------------------------------------------------------

def run_tool(args, timeout=240):
    """A project command in a subprocess -> (CompletedProcess, seconds). One that runs past `timeout` (a
    hung process group, say) is killed and reported as exit 124, so that the check still ends in time."""
    start = time.perf_counter()
    try:
        run = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                             cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        run = subprocess.CompletedProcess(e.cmd, 124, "", err + f"\n(killed after {timeout} s)")
    return run, time.perf_counter() - start


def infer_runs(ctx):
    base = [ROOT / "infer.py", ctx.image_path, QUESTION, "--model", ctx.folder, "--device", ctx.device.type,
            "--max-new-tokens", "32"]
    out = {}
    run, seconds = run_tool(base + ["--timing"])
    lines = run.stderr.strip().splitlines()
    out["timing"] = {"exit": run.returncode, "wall_s": round(seconds, 1), "stderr": lines[-8:],
                     **timing_numbers(lines)}
    run, seconds = run_tool(base + ["--dtype", "float16"])
    out["float16"] = {"exit": run.returncode, "stderr": run.stderr.strip().splitlines()[-2:],
                      "answer": run.stdout.strip()[:200]}
    return out


def timing_numbers(lines):
    """The numbers of infer.py --timing's lines: start-up, TTFT, decode rate, peak GPU and host memory."""
    import re

    patterns = {"startup_ms": r"start-up, first call only: (\d+) ms", "ttft_ms": r"time to first token: (\d+) ms",
                "decode_tokens_per_s": r"decode: \d+ tokens, ([\d.]+) tokens/s",
                "peak_gpu_mib": r"peak GPU memory: (\d+) MiB", "peak_host_mib": r"peak process memory: (\d+) MiB"}
    text = "\n".join(lines)
    found = {key: re.search(pattern, text) for key, pattern in patterns.items()}
    return {key: float(m.group(1)) for key, m in found.items() if m}


def train_runs(ctx):
    import shapes_data

    work = Path(tempfile.mkdtemp(prefix="gpu-check-train-"))
    data = shapes_data.generate(work / "data", 32, 0, seed=0)
    common = ["--stage", "2", "--data", data / "train.json", "--images", data / "images", "--steps", "3",
              "--batch-size", "2" if ctx.quick else "4", "--device", ctx.device.type, "--no-progress"]
    out = {}
    for name, extra in [("0.5B" if not ctx.quick else "small", []),
                        ("0.5B --grad-checkpoint" if not ctx.quick else "small --grad-checkpoint", ["--grad-checkpoint"])]:
        run, seconds = run_tool([ROOT / "train.py", "--init", ctx.folder, "--out", work / name.replace(" ", "_"),
                                 *common, *extra])
        out[name] = summarize_training(run, seconds, work / name.replace(" ", "_"))
        shutil.rmtree(work / name.replace(" ", "_"), ignore_errors=True)   # 10 GB of state at the 0.5B shape
    run, seconds = run_tool(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                             ROOT / "train.py", "--init", ROOT / "models" / "fastvlm-tiny", "--out", work / "torchrun",
                             *common])
    out["torchrun tiny, 1 process"] = summarize_training(run, seconds, work / "torchrun")
    return out


def summarize_training(run, seconds, folder):
    rows = []
    if (folder / "log.jsonl").is_file():
        rows = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "loss" in r]
    starts = [i for i, r in enumerate(steps) if r["step"] == 1]
    steps = steps[starts[-1]:] if starts else []             # this run's rows (an --init's log is copied first)
    peaks = [r["peak_gpu_mib"] for r in steps if "peak_gpu_mib" in r]
    return {"exit": run.returncode, "wall_s": round(seconds, 1), "steps": len(steps),
            "losses": [round(r["loss"], 4) for r in steps],
            "samples_per_s_last": round(steps[-1]["samples_per_s"], 2) if steps else None,
            "peak_gpu_mib": max(peaks) if peaks else None,
            "stderr_tail": run.stderr.strip().splitlines()[-3:] if run.returncode else []}


# ----------------------------------------------------------------------------------------------------
# The run and its table.
# ----------------------------------------------------------------------------------------------------

class Context:
    def __init__(self, args):
        from PIL import Image

        self.device = torch.device(args.device)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.quick, self.runs = args.quick, 1 if args.quick else args.runs
        self.new, self.new_check = (8, 8) if args.quick else (args.new_tokens, 32)
        work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
        if args.quick:
            self.folder = write_fastvlm_checkpoint(work / "model", SMALL_LLM, bench.QUICK_VISION)
        else:
            self.folder = write_fastvlm_checkpoint(work / "model", LLM_0_5B)     # bf16, as Apple stores it
        self.image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8))
        self.image_path = work / "image.png"
        self.image.save(self.image_path)


def machine(device):
    info = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "python": sys.version.split()[0]}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    multiprocessors=props.multi_processor_count)
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def table(report):
    """The report's numbers as one markdown table (what docs/performance.md takes)."""
    lines = ["| measurement | ours | plain model files | transformers | ours / transformers |", "|---|---|---|---|---|"]
    ours, plain, ref = (report.get(k) or {} for k in ("ours", "plain", "transformers"))

    def row(label, key, fmt, better_low=True):
        values = [d.get(key) for d in (ours, plain, ref)]
        cells = [format(v, fmt) if isinstance(v, (int, float)) else "" for v in values]
        ratio = f"{values[0] / values[2]:.2f}x" if all(isinstance(v, (int, float)) and v for v in (values[0], values[2])) else ""
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {ratio} |")

    for label, key in [("preprocess (ms)", "preprocess_ms"),
                       ("vision encoder (ms; transformers' includes the projector)", "encoder_ms"),
                       ("projector (ms)", "projector_ms"), ("LLM prefill (ms)", "prefill_ms"),
                       ("**time to first token (ms)**", "ttft_ms"), ("follow-up turn (ms)", "follow_up_ms"),
                       ("start-up, first call (ms)", "startup_ms")]:
        row(label, key, ".1f")
    row("**decode (tokens/s)**", "decode_tokens_per_s", ".0f")
    bw = report.get("copy_bandwidth_gb_s")
    if bw and ours.get("weight_bytes_per_token"):
        wall = bw * 1e9 / ours["weight_bytes_per_token"]
        lines.append(f"| decode, fraction of the weight-read limit ({wall:.0f} tokens/s at {bw:.0f} GB/s) | "
                     + " | ".join(f"{d['decode_tokens_per_s'] / wall:.1%}" if d.get("decode_tokens_per_s") else ""
                                  for d in (ours, plain, ref)) + " | |")
    layouts = ours.get("encoder_layouts")
    if layouts:
        lines.append(f"| encoder NCHW / channels-last (ms) | {layouts['nchw_ms']:.1f} / "
                     f"{layouts['channels_last_ms']:.1f} | | | |")
    return "\n".join(lines)


def write_report(path, report):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str))
    tmp.replace(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default), or cpu with --quick to check the script")
    p.add_argument("--quick", action="store_true", help="tiny shapes, one run: checks the script runs")
    p.add_argument("--runs", type=int, default=5, help="timed runs per measurement (median)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens decoded for the decode rate")
    p.add_argument("--skip", nargs="*", default=[], choices=["agreement", "timing", "transformers", "infer", "train"])
    p.add_argument("--out", type=Path, default=ROOT / "results" / "gpu_check.json")
    p.add_argument("--budget", type=float, default=0, metavar="SECONDS",
                   help="start no part after this many seconds (0: no limit), for a machine lent for minutes")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA GPU here; run it on one, or pass --device cpu --quick to check the script",
              file=sys.stderr)
        return 2
    torch.set_grad_enabled(False)                   # inference only here (train.py runs in its own process)
    start = time.perf_counter()
    ctx = Context(args)
    report = {"machine": machine(ctx.device), "device": str(ctx.device), "dtype": str(ctx.dtype),
              "quick": ctx.quick, "runs": ctx.runs, "errors": {}}
    print(f"checkpoint at {ctx.folder} ({time.perf_counter() - start:.0f} s); {report['machine']}", flush=True)
    parts = [("agreement", "agreement", lambda: agreement(ctx)),
             ("timing", "ours", lambda: time_ours(ctx, fast=True)),
             ("timing", "plain", lambda: time_ours(ctx, fast=False)),
             ("timing", "copy_bandwidth_gb_s", lambda: copy_bandwidth(ctx.device) / 1e9),
             ("transformers", "transformers", lambda: time_transformers(ctx)),
             ("infer", "infer", lambda: infer_runs(ctx)),
             ("train", "train", lambda: train_runs(ctx))]
    for group, key, fn in parts:
        if group in args.skip:
            continue
        if args.budget and time.perf_counter() - start > args.budget:
            report["errors"][key] = f"not run: the --budget of {args.budget:g} s was spent"
            continue
        t = time.perf_counter()
        try:
            report[key] = fn()
        except Exception as e:                      # record it, go on with the next part
            traceback.print_exc()
            report["errors"][key] = f"{type(e).__name__}: {e}"
        print(f"{key}: {time.perf_counter() - t:.0f} s", flush=True)
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
        write_report(args.out, report)              # after every part: a run cut short keeps what it had
    report["seconds"] = time.perf_counter() - start
    write_report(args.out, report)
    print(f"\n{report['machine']}\n")
    print(table(report))
    agree = report.get("agreement") or {}
    for name, r in agree.items():
        if isinstance(r, dict) and "max_logit_diff_in_std" in r:
            print(f"{name} ({r['decoder']}, graphs {r['graphs'] or 'none'}"
                  f"{', RECORDING FAILED' if r['graphs_failed'] else ''}): logits within {r['max_logit_diff_in_std']:.2e} std of the CPU's, "
                  f"top-1 {'equal' if r['top1_equal'] else 'DIFFERENT'}, greedy equal for "
                  f"{r['greedy_equal_prefix']} of {r['greedy_tokens']} tokens")
    if agree:
        print(f"graph vs eager decode, fp32: {agree['graph_vs_eager_fp32']}; pixel values exact: {agree['pixels_exact']}")
    if report.get("infer"):
        timing, half = report["infer"]["timing"], report["infer"]["float16"]
        print(f"\ninfer.py --timing, first call (exit {timing['exit']}, {timing['wall_s']} s in all): "
              + ", ".join(f"{k} {v:g}" for k, v in timing.items() if k not in ("exit", "wall_s", "stderr")))
        print(f"infer.py --dtype float16: exit {half['exit']}: {(half['stderr'] or [''])[-1]}")
    if report.get("train"):
        print("\n| train.py, 3 steps | exit | wall (s) | losses | samples/s (last step) | peak GPU memory (MiB) |\n"
              "|---|---|---|---|---|---|")
        for name, r in report["train"].items():
            print(f"| {name} | {r['exit']} | {r['wall_s']} | {', '.join(f'{x:.3f}' for x in r['losses'])} | "
                  f"{r['samples_per_s_last']} | {r['peak_gpu_mib']} |")
            if r["stderr_tail"]:
                print(f"  {r['stderr_tail']}")
    if report["errors"]:
        print(f"errors: {report['errors']}")
    print(f"wrote {args.out} ({report['seconds']:.0f} s)")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
