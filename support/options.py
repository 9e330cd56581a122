"""The command lines of infer.py and train.py: every option with its default in its help, and every
bound checked before anything is loaded or written. A refusal is one line that names the option, its
bound and why (infer.py raises UsageError, train.py DataError; both print it and exit with 2)."""

import argparse
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path


class DataError(ValueError):
    """A problem with the training data or options; the message names the file and the record."""

# ----------------------------------------------------------------------------------------------------
# infer.py
# ----------------------------------------------------------------------------------------------------
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "fastvlm-tiny"


def infer_parser(description):
    """infer.py's command line; every option's help gives its default."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", nargs="?", help="image file (PNG, JPEG, ...)")
    p.add_argument("question", nargs="?", help="question about the image; omit it for an interactive chat")
    p.add_argument("--model", default=None,
                   help="FastVLM folder or Hugging Face repo id (ORG/NAME) "
                        f"(default: the embedded {DEFAULT_MODEL.name})")
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="a LoRA adapter folder (train.py --lora, or PEFT's) for --model, applied without merging; "
                        "refused if it was made for other weights; with --quantize int8 it is merged first "
                        "(default: none)")
    p.add_argument("--batch", type=Path, default=None, metavar="JSONL",
                   help="answer every question of this file, one JSON object per line (default: none, "
                        "one question about IMAGE)")
    p.add_argument("--out", type=Path, default=None, metavar="JSONL",
                   help="with --batch: append answers here and skip the ids it already has; locked while a run "
                        "writes to it (default: stdout)")
    p.add_argument("--json", action="store_true",
                   help="print the answer as one JSON object (default: off, the answer streams as text)")
    p.add_argument("--system", default=None, help="replace the system prompt (default: the model's own)")
    # The one count a user gives. Its bound is the model's context: the prompt (with the image's tokens,
    # 256 at 1024 px for FastViTHD) and the answer must fit in it together; Chat.reserve names both.
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N",
                   help="the most tokens an answer may have, at least 1 and at most what the model's context "
                        "(8192 tokens for FastVLM) leaves after the prompt and the image's tokens "
                        "(default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="sampling temperature, a finite number >= 0; 0 = greedy (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="sample only from the most likely tokens that together hold this probability, "
                        "in (0, 1] (default: %(default)s, every token)")
    p.add_argument("--seed", type=int, default=None, metavar="S",
                   help="makes sampling (temperature > 0) repeatable: a whole number from 0 to 2**63 - 1, the "
                        "range of torch's generator (default: none, every run samples anew)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="where to run; auto = cuda, else mps, else cpu (default: %(default)s)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="the weights' and activations' type; auto = bfloat16 on cuda, float16 on mps, and on cpu "
                        "bfloat16 where the CPU has bf16 matmul units (AVX512-BF16, AMX, Arm BF16), else float32; "
                        "float32 gives the reference answers; float16 is refused on cpu (default: %(default)s)")
    p.add_argument("--quantize", default="none", choices=["none", "int8"],
                   help="int8: the decoder's weights in int8 with a scale per output row, a quarter of float32's "
                        "bytes, for faster decoding on a CPU (answers differ slightly: docs/performance.md) "
                        "(default: %(default)s)")
    p.add_argument("--timing", action="store_true",
                   help="print the TTFT breakdown, decode speed and peak memory on stderr (default: off)")
    p.add_argument("--plain", action="store_true",
                   help="run the plain model files, without the speed step of support/speedups.py (slower; in float32 "
                        "the same answers) (default: off)")
    return p


class UsageError(Exception):
    pass


MAX_SAMPLING_SEED = 2**63 - 1    # torch's generator: infer.py's --seed and serve.py's `seed`


def pick_device(name):
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())}
    if not available[name]:
        raise UsageError(f"device '{name}' is not available on this machine; use --device auto or cpu")
    return torch.device(name)


def pick_dtype(name, device):
    """(the torch dtype to run in, why it was chosen, in words) for --dtype `name` on `device`."""
    import torch

    from support.speedups import bf16_units

    if name == "auto":
        if device.type == "cpu":
            units, why = bf16_units()
            return (torch.bfloat16 if units else torch.float32), f"--dtype auto: {why}"
        gpu = {"cuda": torch.bfloat16, "mps": torch.float16}[device.type]
        return gpu, f"--dtype auto: {str(gpu).removeprefix('torch.')} on {device.type}"
    if name == "float16" and device.type == "cpu":
        raise UsageError("float16 is refused on CPU (slow and poorly supported there); "
                         "use --dtype float32 or bfloat16")
    return getattr(torch, name), f"--dtype {name}"


def is_utf8(text):
    try:
        text.encode("utf-8")       # undecodable bytes in argv arrive as surrogates, which cannot be encoded
        return True
    except UnicodeEncodeError:
        return False


def check_counts(counts, error):
    """Each (option, value, lowest, highest, why) of `counts` within its bounds, else `error` (the entry
    point's exception) with one line that names the bound and, for an upper one, why. An option left
    unset (None) is not checked; a highest of None is no upper bound here."""
    for name, value, low, high, why in counts:
        if value is not None and value < low:
            raise error(f"{name} must be at least {low}" + (" (the prompt template alone takes about 25 tokens)"
                                                          if name == "--max-length" else ""))
        if value is not None and high is not None and value > high:
            raise error(f"{name} must be at most {high:,} ({why})")


def check_options(args):
    """infer.py's options that cannot work, before anything is loaded. Its one count without a bound here,
    --max-new-tokens, is bounded by the model's context, which Chat.reserve checks."""
    check_counts((("--max-new-tokens", args.max_new_tokens, 1, None, None),
                  ("--seed", args.seed, 0, MAX_SAMPLING_SEED, "the range of torch's generator")), UsageError)
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise UsageError("--temperature must be a finite number >= 0 (0 = greedy)")
    if not 0 < args.top_p <= 1:
        raise UsageError("--top-p must be in (0, 1]")
    check_speed_options(args)
    if args.batch is not None:
        if args.image is not None:
            raise UsageError("--batch takes the images and questions from its file; drop the IMAGE argument")
        if args.json:
            raise UsageError("--batch already writes JSON lines; drop --json")
    else:
        if args.image is None:
            raise UsageError("give an image (and a question), or --batch FILE; see --help")
        if args.out is not None:
            raise UsageError("--out goes with --batch")
        if args.json and args.question is None:
            raise UsageError("--json needs a question (the chat is interactive)")
    for text, what in ((args.question, "the question"), (args.system, "--system"),
                       (args.image, "the image path")):
        if text is not None and not is_utf8(text):
            raise UsageError(f"{what} is not valid UTF-8 text; check your terminal's encoding")
    if args.question is not None and not args.question.strip():
        raise UsageError("the question is empty; ask something about the image, or omit it to chat")


def check_speed_options(args):
    """The speed options infer.py and serve.py share: --quantize is part of the speed step --plain leaves out."""
    if args.quantize != "none" and args.plain:
        raise UsageError("--quantize is part of the speed step that --plain leaves out; drop one of them")


def load(args):
    """(model, tokenizer, config, device) for infer.py's options; the model is named by --model (or the
    embedded default)."""
    import torch

    from support.loading import load_model, model_bytes

    device = pick_device(args.device)
    dtype, why = pick_dtype(args.dtype, device)
    quantize = None if args.quantize == "none" else args.quantize
    if quantize is not None and device.type != "cpu":
        raise UsageError(f"--quantize {quantize} runs on the CPU only (torch's int8 kernel); on {device.type} "
                         "use --dtype bfloat16, or --device cpu")
    if args.model is None and not DEFAULT_MODEL.is_dir():
        raise UsageError(f"the embedded default model ({DEFAULT_MODEL}) is not in this checkout yet; "
                         "pass --model FOLDER with an official FastVLM checkpoint (see README)")
    torch.set_grad_enabled(False)
    start = time.perf_counter()
    model, tokenizer, config = load_model(DEFAULT_MODEL if args.model is None else args.model, device=device,
                                          dtype=dtype, fast=not args.plain, progress=True, quantize=quantize,
                                          adapter=args.adapter)
    model.precision = Precision(str(dtype).removeprefix("torch."), why, quantize, model_bytes(model),
                                time.perf_counter() - start)
    return model, tokenizer, config, device


@dataclass
class Precision:
    """How a loaded model runs, for --timing and --json: its dtype and why, its weights' format and bytes,
    and the seconds its loading took (reading, converting, quantizing)."""
    dtype: str
    why: str
    quantize: str = None
    weight_bytes: int = 0
    load_seconds: float = 0.0

    def line(self):
        from support.loading import size_text

        weights = (f"int8 decoder weights, decoded with bfloat16 activations; the rest in {self.dtype}"
                   if self.quantize else self.dtype)
        return (f"ran in {self.dtype} ({self.why}); weights: {size_text(self.weight_bytes)} ({weights}), "
                f"loaded in {self.load_seconds:.1f} s")

    def record(self):
        return {"dtype": self.dtype, "dtype_why": self.why, "quantize": self.quantize,
                "weight_mib": round(self.weight_bytes / 2**20, 1), "load_s": round(self.load_seconds, 2)}


# ----------------------------------------------------------------------------------------------------
# train.py
# ----------------------------------------------------------------------------------------------------

# Upper bounds of the options; each refusal names its bound and the reason for it.
MAX_STEPS = 10_000_000       # a typo guard: at one step a second, about four months of training
MAX_STEP_SAMPLES = 4096      # samples per process per step: a step's micro-batches are decoded and held together
MAX_LENGTH = 32768           # Qwen2's context (max_position_embeddings in the released FastVLM configs)
MAX_IMAGE_SIZE = 4096        # the largest side repmixer.FastViTHDConfig accepts: a checkpoint must load again
MAX_SEED = 2**64 - 1 - MAX_STEPS   # torch's generators take values below 2**64, and the distributed
                                   # sampler draws epoch e's order from --seed + e (at most MAX_STEPS epochs)


def train_parser(description, stages):
    """train.py's command line; every option's help gives its default. `stages`: train.STAGES."""
    lora_default = lora_defaults()
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=sorted(stages), required=True,
                   help="which parts learn, and the default learning rate (see above)")
    p.add_argument("--data", required=True, nargs="+", help="LLaVA-format data: JSON arrays or JSON lines, "
                   "one file or several (datasets mixed)")
    p.add_argument("--images", required=True, nargs="+", help="folder the records' image paths are relative to: "
                   "one for all data files, or one per file in the same order")
    p.add_argument("--eval-data", nargs="+", help="held-out LLaVA data, evaluated every --eval-every steps and "
                   "at the end: loss, and exact match of short answers (default: none)")
    p.add_argument("--eval-images", help="folder of the held-out images (default: the first --images)")
    p.add_argument("--eval-every", type=int, default=0,
                   help="evaluate every N steps, 0: at the end only (default: %(default)s)")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard parameters, gradients and optimizer "
                   "state across the processes (PyTorch FSDP2) instead of a full copy on each (DDP)")
    p.add_argument("--grad-checkpoint", action="store_true",
                   help="recompute activations in the backward pass (LLM layers, encoder stages): less memory")
    p.add_argument("--image-sizes", help="comma-separated image sizes for equal shares of the run, rising: "
                   "512,768,1024 trains the first third of the steps at 512 px (default: the model's size; with --resume, "
                   "the schedule the run was started with)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader processes that decode and preprocess "
                   "ahead of the training loop, at most one per CPU; 0: in the loop (default: %(default)s)")
    p.add_argument("--skip-missing-images", action="store_true",
                   help="leave out (and count) records whose image is missing or unreadable, instead of stopping")
    p.add_argument("--out", required=True, help="output folder (a FastVLM checkpoint + training state)")
    p.add_argument("--init", help="FOLDER to fine-tune or continue, or 'scratch' for a tiny model (no default: "
                   "give it, or --init-llm with --init-vision, unless --resume)")
    p.add_argument("--init-llm", help="HF Qwen2 folder for the language model, with --init-vision (default: none)")
    p.add_argument("--init-vision", help="FastVLM folder whose vision tower to use, with --init-llm (default: none)")
    p.add_argument("--tokenizer-data", nargs="*", help="with --init scratch: more LLaVA JSONs whose texts the "
                   "tokenizer is trained on (the data of later stages), besides --data (default: none)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its training state")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the stage's: "
                   + ", ".join(f"{stage} {lr:g}" for stage, (_, lr) in stages.items()) + ")")
    p.add_argument("--epochs", type=float, default=1.0,
                   help="passes over the data, fractions allowed; LLaVA-1.5 trains each stage for one "
                   "(default: %(default)s)")
    p.add_argument("--steps", type=int, help="optimizer steps (default: as many as --epochs gives)")
    p.add_argument("--batch-size", type=int, default=16, help="samples per process, per micro-batch "
                   "(default: %(default)s)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step; the global batch "
                   "is batch-size x processes x grad-accum (default: %(default)s)")
    p.add_argument("--warmup", type=float, default=0.03, help="fraction of the steps with a linear warm-up "
                   "(default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW's decoupled weight decay "
                   "(default: %(default)s, as LLaVA-1.5)")
    p.add_argument("--clip", type=float, default=1.0, help="max gradient norm (default: %(default)s)")
    p.add_argument("--loss-average", choices=["token", "sample"], default="token",
                   help="normalise by answer tokens (LLaVA) or give every sample equal weight (default: %(default)s)")
    p.add_argument("--max-length", type=int, default=2048, help="longer samples are truncated and counted "
                   "(default: %(default)s)")
    p.add_argument("--bn", choices=["auto", "train", "eval"], default="auto",
                   help="BatchNorm statistics in the encoder: auto = train from scratch, eval when fine-tuning "
                   "(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="starting state of the random number generators: a "
                   "scratch model's initial weights and the data order (default: %(default)s)")
    p.add_argument("--save-every", type=int, default=0, help="also checkpoint every N steps, 0: at the end only "
                   "(default: %(default)s)")
    p.add_argument("--stop-after", type=int, help="stop (with a checkpoint) after N steps, for --resume "
                   "(default: run to the end)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: CUDA where there is a GPU, else the CPU (default: %(default)s)")
    p.add_argument("--threads", type=int, help="CPU threads, at most one per CPU (torch.set_num_threads; "
                   "default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (the log and the last lines stay)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="bfloat16: every product under bf16 autocast and, with --lora, the frozen base stored in "
                        "bf16; what learns and AdamW's moments stay float32; auto = bfloat16 on cuda, and on a cpu "
                        "with bf16 units (AVX512-BF16, AMX, Arm BF16) for --lora; float32 elsewhere "
                        "(default: %(default)s)")
    p.add_argument("--freeze", nargs="+", default=None, choices=["vision_tower", "mm_projector", "llm"],
                   help="keep these parts frozen although the stage trains them, e.g. vision_tower with --stage 2 "
                        "--lora for LLaVA-1.5's LoRA recipe (default: none)")
    lora = p.add_argument_group("LoRA: low-rank adapters instead of the decoder's weights (LLaVA-1.5's "
                                "scripts/v1_5/finetune_lora.sh)")
    lora.add_argument("--lora", type=int, default=None, metavar="R",
                      help="adapters of rank R on the --lora-layers; LLaVA-1.5 uses 128 (default: off, full training)")
    lora.add_argument("--lora-alpha", type=float, default=None,
                      help="the update is scaled by alpha / R (default: 2 x R, LLaVA-1.5's 256 for 128)")
    lora.add_argument("--lora-dropout", type=float, default=lora_default["lora_dropout"],
                      help="dropout on the adapters' input while training (default: %(default)s, LLaVA-1.5's)")
    lora.add_argument("--lora-layers", default=lora_default["lora_layers"],
                      help="comma-separated names of the linear layers that get adapters, each matching a layer's "
                           "name or its end; mm_projector.0 and mm_projector.2 adapt the projector (default: "
                           "%(default)s, every linear layer of the decoder, as LLaVA-1.5)")
    lora.add_argument("--lora-lr", type=float, default=lora_default["lora_lr"],
                      help="peak learning rate of the adapters; the parts trained in full keep --lr "
                           "(default: %(default)s, LLaVA-1.5's)")
    lora.add_argument("--merge", action="store_true",
                      help="write the base model with the adapters merged in, in the base's own layout, instead of "
                           "the adapter files (default: off)")
    return p


def read_sizes(text):
    """`--image-sizes 512,768,1024` -> [512, 768, 1024]: rising and at most MAX_IMAGE_SIZE (64000 once
    reached PIL and failed there with a MemoryError). Checked before anything loads (check_arguments);
    parse_sizes adds the encoder's stride once the model is there."""
    try:
        sizes = [int(t) for t in text.split(",")]
    except ValueError:
        raise DataError(f"--image-sizes {text!r}: give sizes in pixels separated by commas, e.g. 512,768,1024") from None
    if min(sizes) <= 0:
        raise DataError(f"--image-sizes: {min(sizes)} is not a size in pixels; give positive sizes, e.g. 512,768,1024")
    big = [n for n in sizes if n > MAX_IMAGE_SIZE]
    if big:
        raise DataError(f"--image-sizes: {big[0]} is above {MAX_IMAGE_SIZE} px, the largest side a FastViTHD config "
                        "accepts (a checkpoint trained at it could not be loaded); the released model runs at 1024")
    if any(b <= a for a, b in zip(sizes, sizes[1:])):
        raise DataError(f"--image-sizes {text}: the sizes must rise, one share of the steps each in order (stage "
                        "1.5 trains at increasing resolutions), e.g. 512,768,1024")
    return sizes


def parse_sizes(text, vision_cfg):
    """read_sizes, each size also a positive multiple of the encoder's stride (known once the model is)."""
    sizes = read_sizes(text)
    bad = [n for n in sizes if n % vision_cfg.stride]
    if bad:
        raise DataError(f"--image-sizes: {bad[0]} is not a positive multiple of the encoder's stride {vision_cfg.stride}")
    return sizes


def cpu_count():
    """The CPUs this process may run on (its affinity, where the system has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def check_arguments(args):
    """Options that cannot work, before anything is loaded or written. Every count has an upper bound
    that names its limit and why (--workers 100000 once started about 1,600 processes and filled 24 GB)."""
    cpus = cpu_count()
    held = "a step's micro-batches are decoded and held in memory together"
    typo = "a guard against typos: at one step a second that is about four months"
    counts = (("--batch-size", args.batch_size, 1, MAX_STEP_SAMPLES, held),
              ("--grad-accum", args.grad_accum, 1, MAX_STEP_SAMPLES, held),
              ("--max-length", args.max_length, 32, MAX_LENGTH, "Qwen2's context, max_position_embeddings in the "
                                                                "released configs"),
              ("--steps", args.steps, 1, MAX_STEPS, typo), ("--save-every", args.save_every, 0, MAX_STEPS, typo),
              ("--stop-after", args.stop_after, 1, MAX_STEPS, typo), ("--eval-every", args.eval_every, 0, MAX_STEPS, typo),
              ("--workers", args.workers, 0, cpus, "the CPUs this process may use: each worker is a process that "
                                                   "decodes on a core of its own, more only compete for cores and memory"),
              ("--threads", args.threads, 1, cpus, "the CPUs this process may use: more threads only compete for them"),
              ("--seed", args.seed, 0, MAX_SEED, "torch's generators take seeds below 2**64, and each epoch's data "
                                                 f"order is drawn with --seed + the epoch, up to {MAX_STEPS:,}"))
    check_counts(counts, DataError)
    if args.batch_size * args.grad_accum > MAX_STEP_SAMPLES:
        raise DataError(f"--batch-size x --grad-accum must be at most {MAX_STEP_SAMPLES:,} samples per process per "
                        f"step ({held}); use more processes for a larger global batch")
    for name, value in (("--lr", args.lr), ("--epochs", args.epochs), ("--clip", args.clip)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise DataError(f"{name} must be a finite number > 0")
    if args.epochs > MAX_STEPS:
        raise DataError(f"--epochs must be at most {MAX_STEPS:,} ({typo})")
    if not (0 <= args.warmup <= 1):                 # (nan fails both comparisons)
        raise DataError("--warmup is the fraction of the steps that warm up: a number from 0 to 1")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        raise DataError("--weight-decay must be a finite number >= 0 (AdamW shrinks each weight by lr x weight "
                        "decay of itself every step)")
    if args.image_sizes:
        read_sizes(args.image_sizes)              # the stride check waits for the model (parse_sizes)
    check_lora_arguments(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file; choose a folder")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise DataError(f"--out {out} is under {parent}, which is a file; choose a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DataError(f"--out {out}: {parent} is not writable; choose a folder you can write to")


def lora_defaults():
    """train.py's LoRA options (all but --lora) and their defaults, LLaVA-1.5's: the parser's and the
    check's one table (--lora-alpha's None stands for 2 x R)."""
    from support.adapters import DECODER_LAYERS

    return {"lora_alpha": None, "lora_dropout": 0.05, "lora_lr": 2e-4, "lora_layers": ",".join(DECODER_LAYERS),
            "merge": False}


def check_lora_arguments(args):
    """--lora and its options, before anything loads (a rank larger than a layer waits for the model)."""
    args.freeze = args.freeze or []
    if args.lora is None:
        given = ["--" + dest.replace("_", "-") for dest, default in lora_defaults().items()
                 if getattr(args, dest) != default]
        if given:
            raise DataError(f"{given[0]} sets up LoRA adapters: add --lora R (e.g. --lora 8), or leave it out")
        return
    if args.lora < 1:
        raise DataError(f"--lora {args.lora}: the adapters' rank must be at least 1 (LLaVA-1.5 uses 128)")
    if args.lora_alpha is None:
        args.lora_alpha = 2.0 * args.lora
    if not (math.isfinite(args.lora_alpha) and args.lora_alpha > 0):
        raise DataError("--lora-alpha must be a finite number > 0 (the update is scaled by alpha / R)")
    if not 0 <= args.lora_dropout < 1:
        raise DataError("--lora-dropout is a probability: a number from 0 up to (not including) 1")
    if not (math.isfinite(args.lora_lr) and args.lora_lr > 0):
        raise DataError("--lora-lr must be a finite number > 0")
    names = list(dict.fromkeys(t.strip() for t in args.lora_layers.split(",")))     # each once, in order
    if not all(names):
        raise DataError(f"--lora-layers {args.lora_layers!r}: give layer names separated by commas, e.g. q_proj,v_proj")
    args.lora_layers = ",".join(names)
    if args.init == "scratch" or args.init_llm or args.init_vision:
        raise DataError("--lora adapts a trained FastVLM: give it with --init FOLDER (or a Hub name)")
    if args.fsdp:
        raise DataError("--fsdp with --lora is not supported: the adapters and their optimizer state are small, so "
                        "leave out --fsdp (DDP) and, for a large base, add --dtype bfloat16")
    if args.image_sizes:
        raise DataError("--image-sizes with --lora is not supported: adapters are trained at the base model's size")


def plan_steps(args, n_records, world):
    """(samples per process per step, steps per epoch, total steps) for `n_records` records, from the
    options and the data alone: called before the model loads, so that an --epochs that gives too many
    steps is refused at once. The distributed sampler (drop_last) gives each process n_records // world."""
    per_step = args.batch_size * args.grad_accum            # samples per process per optimizer step
    steps_per_epoch = n_records // world // per_step
    if steps_per_epoch == 0:
        raise DataError(f"{' '.join(args.data)}: {n_records} records are fewer than one global batch "
                        f"({per_step * world}); lower --batch-size or --grad-accum")
    total_steps = args.steps or max(1, int(args.epochs * steps_per_epoch))
    if total_steps > MAX_STEPS:
        raise DataError(f"--epochs {args.epochs:g} gives {total_steps:,} steps, more than {MAX_STEPS:,} (a guard "
                        "against typos: at one step a second that is about four months)")
    return per_step, steps_per_epoch, total_steps
