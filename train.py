"""Train FastVLM with the paper's recipe (Sec. 4.1, following LLaVA-1.5), on one CPU or many GPUs.

    --stage 1    projector only (vision encoder and LLM frozen), lr 1e-3: align image tokens to the LLM
    --stage 1.5  vision encoder + projector (LLM frozen), lr 2e-5: adapt the encoder (higher resolution)
    --stage 2    everything, lr 2e-5: visual instruction tuning
    --stage 0    everything, lr 1e-3: not in the paper. FastVLM inherits a pretrained encoder (MobileCLIP)
                 and LLM (Qwen2); a model built from scratch must first learn to see and to write, which
                 this stage does on captions before the paper's stages run (the tiny model's recipe).
AdamW, cosine decay after 3 % linear warm-up, gradient accumulation, gradient clipping, bf16 autocast on
CUDA and fp32 on CPU; every default can be overridden on the command line.

Data: LLaVA's conversation format (a JSON list of {"id", "image", "conversations": [{"from": "human",
"value": "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}) plus an image folder; multi-turn; the
`qwen_2` template and the preprocessing of inference; the loss only on the assistant's tokens (each
answer and its <|im_end|>).

Initialisation (--init):
    FOLDER            an official FastVLM checkpoint or one written by this script (fine-tuning). A run
                      folder with training_state.pt continues from its training-form weights;
    scratch           a small model built from TINY_VISION / TINY_LLM with a tokenizer trained on the data;
    --init-llm QWEN2_FOLDER --init-vision FASTVLM_FOLDER
                      an HF Qwen2 for the language model, a FastVLM folder's vision tower, a new projector.

The reparameterizable encoder and BatchNorm, deliberately:
  * From scratch the encoder is built in its *training form* (parallel conv+BN branches, skips), the
    form whose optimisation the reparameterization papers show to be better, and its BatchNorms use
    batch statistics (train mode) while the encoder is trained.
  * Official checkpoints are stored *fused*: the branches are gone, only the ConvFFN BatchNorms remain.
    Fine-tuning keeps that form and keeps those BatchNorms in eval mode (their running statistics come
    from large-batch pre-training; re-estimating them from small fine-tuning batches would hurt, and
    frozen statistics make data-parallel training exactly equal to single-process training).
  * A frozen encoder always runs in eval mode.
  * Checkpoints are always written fused, in the official layout (what `from_pretrained` and infer.py
    read); training_state.pt beside them keeps the training-form weights, the optimizer, scheduler,
    step, RNG and data position, so that --resume (and a later stage's --init) continue exactly.

Distributed: launched by torchrun, each process takes its share of every global batch through a
distributed sampler and DDP averages the gradients (nccl on GPUs, gloo on CPU); without torchrun it is
one process. The global batch is batch-size x processes x grad-accum.

    torchrun --nproc_per_node 8 train.py --stage 2 --init llava-fastvithd_0.5b_stage2 ...
"""

import argparse
import contextlib
import errno
import json
import math
import os
import shutil
import sys
import time
import uuid
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import fastvlm as FV
import qwen2
import repmixer
from checkpoint import CheckpointError, write_errno, write_safetensors

# The tiny model's architecture: FastViTHD's structure (5 stages, RepMixer then attention, final
# expansion) at 256 px -> 4 x 4 = 16 visual tokens, and a 4-layer Qwen2. About 1.2 M parameters.
TINY_VISION = repmixer.FastViTHDConfig(depths=(1, 1, 1, 1, 1), widths=(8, 16, 32, 64, 128), head_dim=16,
                                       image_size=256)
TINY_LLM = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True)
TINY_VOCAB = 384

STAGES = {  # which parts learn, and the peak learning rate (Sec. 4.1; LLaVA-1.5's scripts/v1_5/pretrain.sh
            # trains the projector alone at 1e-3, scripts/v1_5/finetune.sh the model at 2e-5)
    "0": (("vision_tower", "mm_projector", "llm"), 1e-3),   # from scratch only: see the docstring
    "1": (("mm_projector",), 1e-3),
    "1.5": (("vision_tower", "mm_projector"), 2e-5),
    "2": (("vision_tower", "mm_projector", "llm"), 2e-5),
}
STATE = "training_state.pt"

# Upper bounds of the options; each refusal names its bound and the reason for it.
MAX_STEPS = 10_000_000       # a typo guard: at one step a second, about four months of training
MAX_STEP_SAMPLES = 4096      # samples per process per step: a step's micro-batches are decoded and held together
MAX_LENGTH = 32768           # Qwen2's context (max_position_embeddings in the released FastVLM configs)
MAX_IMAGE_SIZE = 4096        # the largest side repmixer.FastViTHDConfig accepts: a checkpoint must load again
MAX_SEED = 2**64 - 1 - MAX_STEPS   # torch's generators take values below 2**64, and the distributed
                                   # sampler draws epoch e's order from --seed + e (at most MAX_STEPS epochs)


class DataError(ValueError):
    """A problem with the training data or options; the message names the file and the record."""


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss, a full disk); the message says what was kept."""


# ----------------------------------------------------------------------------------------------------
# Data.
# ----------------------------------------------------------------------------------------------------

ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}   # LLaVA's names, and the chat names


def read_records(path):
    """The records of one data file: a JSON array (as LLaVA's files are) or JSON lines (one record a line)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e})") from None
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} is not valid JSON ({e})") from None
    else:
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path} line {number} is not valid JSON ({e}); a data file is a JSON "
                                    "array of records or one JSON record a line") from None
    if not records:
        raise DataError(f"{path} holds no records")
    return records


def normalise(r, where, counts):
    """One LLaVA record -> {"id", "image": file name or None (text-only), "conversations": [{"from":
    "human"|"gpt", "value"}]}, alternating from a human turn. A leading assistant turn is dropped, as
    LLaVA's preprocessing drops it, and counted."""
    if not isinstance(r, dict) or not isinstance(r.get("conversations"), list):
        raise DataError(f"{where}: needs 'conversations' (a list of turns) and, unless text-only, 'image'")
    image = r.get("image")
    if isinstance(image, list):
        raise DataError(f"{where}: 'image' lists {len(image)} images; FastVLM is trained with one image per "
                        "conversation: split the record or leave it out")
    if image is not None and (not isinstance(image, str) or not image):
        raise DataError(f"{where}: 'image' must be a file name (or absent, for a text-only conversation)")
    turns = []
    for t in r["conversations"]:
        if not isinstance(t, dict) or t.get("from") not in ROLES or not isinstance(t.get("value"), str):
            raise DataError(f"{where}: conversations must be a list of {{'from': 'human'|'gpt' (or 'user'|"
                            "'assistant'), 'value': str}")
        turns.append({"from": ROLES[t["from"]], "value": t["value"]})
    if turns and turns[0]["from"] == "gpt":
        turns = turns[1:]
        counts["leading assistant turns dropped"] += 1
    if not any(t["from"] == "gpt" for t in turns):
        raise DataError(f"{where}: the conversation has no assistant ('gpt') turn to learn from")
    if any(a["from"] == b["from"] for a, b in zip(turns, turns[1:])):
        raise DataError(f"{where}: turns must alternate human, gpt, human, ... starting with human")
    later = [k for k, t in enumerate(turns) if k > 0 and FV.IMAGE in t["value"]]
    if later:
        raise DataError(f"{where}: turn {later[0]} holds an '{FV.IMAGE}' marker; one image per conversation, "
                        "marked in the first human turn only")
    if image is None:
        if FV.IMAGE in turns[0]["value"]:
            raise DataError(f"{where}: the first turn has an '{FV.IMAGE}' marker but the record no 'image'")
        counts["text-only"] += 1
    return {"id": r.get("id"), "image": image, "conversations": turns}


def image_problem(path):
    """Why an image file cannot be used (a cheap check: it exists and its header is an image's), or None."""
    if not path.is_file():
        return "not found"
    try:
        from PIL import Image

        with Image.open(path):
            return None
    except Exception as e:  # PIL raises several types for files that are not images
        return f"not a readable image ({type(e).__name__})"


def load_records(data_path, image_folder=None, skip_missing=False, counts=None):
    """The normalised records of one data file, each with its image folder. Images are checked when the
    folder is given: a missing or unreadable one stops with the first few named, or with `skip_missing`
    is left out and counted."""
    counts = counts if counts is not None else {}
    for key in ("records", "text-only", "leading assistant turns dropped", "images skipped"):
        counts.setdefault(key, 0)
    out, bad = [], []
    for i, r in enumerate(read_records(data_path)):
        where = f"{data_path} record {i}" + (f" (id {r.get('id')!r})" if isinstance(r, dict) and "id" in r else "")
        rec = normalise(r, where, counts)
        rec["folder"] = None if image_folder is None else Path(image_folder)
        if rec["image"] is not None and image_folder is not None:
            problem = image_problem(rec["folder"] / rec["image"])
            if problem:
                if skip_missing:
                    counts["images skipped"] += 1
                    continue
                bad.append(f"{where}: image {rec['folder'] / rec['image']} {problem}")
        out.append(rec)
    if bad:
        raise DataError(f"{len(bad)} image(s) cannot be used, e.g. {'; '.join(bad[:3])}; fix them or pass "
                        "--skip-missing-images to train without those records")
    counts["records"] += len(out)
    return out


def load_datasets(data_paths, image_folders, skip_missing=False):
    """Every record of several data files (`--data A B --images DIR_A DIR_B`, or one folder for all) and
    the summary line printed at the start."""
    if len(image_folders) not in (1, len(data_paths)):
        raise DataError(f"--images: give one folder for all data files or one per file "
                        f"({len(data_paths)} files, {len(image_folders)} folders)")
    folders = image_folders * len(data_paths) if len(image_folders) == 1 else image_folders
    records, parts, total = [], [], {}
    for path, folder in zip(data_paths, folders):
        counts = {}
        records += load_records(path, folder, skip_missing, counts)
        extra = [f"{n:,} {what}" for what, n in counts.items() if what != "records" and n]
        parts.append(f"{Path(path).name}: {counts['records']:,} records" + (f" ({', '.join(extra)})" if extra else ""))
        for k, v in counts.items():
            total[k] = total.get(k, 0) + v
    return records, "data: " + "; ".join(parts), total


def tokenize_conversation(tokenizer, turns, image=True):
    """ids (with IMAGE_TOKEN_INDEX when `image`) and labels (-100 except on each answer and its <|im_end|>)."""
    ids, labels = [], []

    def add(text, learn):
        piece = FV.tokenize_with_image(tokenizer, text)
        ids.extend(piece)
        labels.extend(piece if learn else [-100] * len(piece))

    add(FV.SYSTEM, False)
    for i, t in enumerate(turns):
        value = t["value"]
        if t["from"] == "human":
            if i == 0 and image:   # the image goes first in the first user turn, as in LLaVA
                value = FV.IMAGE + "\n" + value.replace(FV.IMAGE, "").strip()
            add(FV.USER + value + FV.END + FV.ASSISTANT, False)
        else:
            add(value + FV.END.rstrip("\n"), True)   # the answer and <|im_end|> are learnt ...
            add("\n", False)                         # ... the newline after it is template
    return ids, labels


class Dataset(torch.utils.data.Dataset):
    """(pixels or None for a text-only record, ids, labels) per record; truncation at `max_length` counted."""

    def __init__(self, records, image_folder, tokenizer, image_size, max_length):
        self.records, self.folder = records, None if image_folder is None else Path(image_folder)
        self.tokenizer, self.image_size, self.max_length = tokenizer, image_size, max_length
        self.truncated = 0

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        r = self.records[i]
        pixels = None
        if r.get("image") is not None:
            folder = r.get("folder") or self.folder
            try:
                pixels = FV.preprocess(FV.load_image(folder / r["image"]), self.image_size)
            except FV.InputError as e:
                raise DataError(f"record {i} (id {r.get('id')!r}): {e}") from None
        ids, labels = tokenize_conversation(self.tokenizer, r["conversations"], image=pixels is not None)
        if len(ids) > self.max_length:     # truncate (and count), as LLaVA does at model_max_length
            ids, labels = ids[:self.max_length], labels[:self.max_length]
            if FV.IMAGE_TOKEN_INDEX not in ids:
                pixels = None
            self.truncated += 1
        return pixels, torch.tensor(ids), torch.tensor(labels)


def size_at(step, total_steps, sizes):
    """The image size of an optimizer step under `--image-sizes`: equal shares of the run, in order (stage
    1.5 "at increasing resolutions": 512, 768, 1024 gives the first third of the steps at 512 px)."""
    return sizes[min(len(sizes) - 1, step * len(sizes) // max(1, total_steps))]


class StepBatches(torch.utils.data.Dataset):
    """The micro-batches of optimizer steps `first` to `last` - 1, in training order: item k is this
    process's micro-batch k, collated, at the image size of its step. A DataLoader's workers build them
    ahead of the training loop; everything about an item follows from its step, so a resumed run sees
    the same samples in the same order, with any number of workers.

    A record whose image fails to decode is left out with `skip` (the item names it, so that the loop
    counts each such record once however often it comes round); otherwise the item carries the error
    for the loop to report (an exception raised in a worker would arrive with its traceback)."""

    def __init__(self, dataset, sampler, plan, first, last, pad_id, skip):
        self.dataset, self.sampler, self.plan, self.pad_id, self.skip = dataset, sampler, plan, pad_id, skip
        self.first, self.last = first, last
        self.orders = {}

    def __len__(self):
        return (self.last - self.first) * self.plan["grad_accum"]

    def __getitem__(self, k):
        plan = self.plan
        step, j = divmod(k, plan["grad_accum"])
        step += self.first
        epoch, position = divmod(step, plan["steps_per_epoch"])
        if epoch not in self.orders:                     # this process's share of the epoch's permutation
            self.sampler.set_epoch(epoch)
            self.orders = {epoch: list(self.sampler)}
        start = position * plan["per_step"] + j * plan["batch_size"]
        self.dataset.image_size = size_at(step, plan["total_steps"], plan["image_sizes"])
        truncated, items, skipped = self.dataset.truncated, [], []
        for i in self.orders[epoch][start:start + plan["batch_size"]]:
            try:
                items.append(self.dataset[i])
            except DataError as e:
                if not self.skip:
                    return {"error": str(e)}
                skipped.append(i)
        if not items:
            return {"error": "every record of a micro-batch had an image that failed to decode"}
        return {"batch": collate(items, self.pad_id), "skipped": skipped,
                "truncated": self.dataset.truncated - truncated, "image_size": self.dataset.image_size}


def collate(items, pad_id):
    """Right-padded ids and labels; the images of the records that have one, in order (maybe none)."""
    images = [p for p, _, _ in items if p is not None]
    pixels = torch.stack(images) if images else None
    T = max(len(i) for _, i, _ in items)
    ids = torch.full((len(items), T), pad_id)
    labels = torch.full((len(items), T), -100)
    for b, (_, i, l) in enumerate(items):
        ids[b, :len(i)], labels[b, :len(l)] = i, l
    return pixels, ids, labels


# ----------------------------------------------------------------------------------------------------
# Model initialisation and checkpoints.
# ----------------------------------------------------------------------------------------------------

def build_scratch(records):
    """The tiny model, and a tokenizer trained on the template and every text of `records`."""
    texts = [FV.SYSTEM + FV.USER + FV.ASSISTANT] + [t["value"] for r in records for t in r["conversations"]]
    tokenizer = qwen2.train_tokenizer(texts, TINY_VOCAB)
    llm_cfg = qwen2.Qwen2Config(vocab_size=len(tokenizer), **TINY_LLM)
    model = FV.FastVLM(TINY_VISION, llm_cfg, fused=False)
    model.llm.init_weights()
    return model, tokenizer


def model_from_state(state, tokenizer_folder):
    vision_cfg = repmixer.FastViTHDConfig.from_dict(state["vision_cfg"])
    model = FV.FastVLM(vision_cfg, qwen2.Qwen2Config.from_dict(state["llm_cfg"]), fused=state["fused"])
    model.load_state_dict(state["model"])
    return model, FV.load_tokenizer(tokenizer_folder)


def initialise(args, records):
    """(model, tokenizer, trained-from-scratch?, steps trained before) as --init / --init-llm /
    --init-vision ask. A run folder's training state is read once (it holds the optimizer too: for the
    0.5B model gigabytes)."""
    if args.init == "scratch":
        corpus = records
        for extra in args.tokenizer_data or []:
            corpus = corpus + load_records(extra)
        model, tokenizer = build_scratch(corpus)
        return model, tokenizer, True, 0
    if args.init:
        folder = Path(args.init)
        if (folder / STATE).is_file():
            state = load_state(folder / STATE)
            model, tokenizer = model_from_state(state, folder)
            return model, tokenizer, not state["fused"], state.get("prior_steps", 0) + state["step"]
        model, tokenizer, _ = FV.FastVLM.from_pretrained(folder, fold_batchnorm=False)
        return model, tokenizer, False, 0
    if args.init_llm and args.init_vision:
        llm = FV.load_qwen2(args.init_llm)
        vlm, _, config = FV.FastVLM.from_pretrained(args.init_vision, fold_batchnorm=False)
        model = FV.FastVLM(vlm.vision_tower.cfg, llm.cfg, fused=True)
        model.vision_tower, model.llm = vlm.vision_tower, llm
        return model, FV.load_tokenizer(args.init_llm), False, 0
    raise DataError("choose an initialisation: --init FOLDER, --init scratch, or --init-llm with --init-vision")


def export_tensors(model):
    """Official-layout tensors of a (possibly training-form) model: the encoder fused, ConvFFN BN kept."""
    import copy

    tower = copy.deepcopy(model.vision_tower).eval()
    for m in tower.modules():
        if isinstance(m, repmixer.Reparameterizable) and not isinstance(m, repmixer.ConvFFN):
            m.reparameterize()
    ours = {"vision_tower." + k: v for k, v in tower.state_dict().items()}
    ours.update({"mm_projector." + k: v for k, v in model.mm_projector.state_dict().items()})
    llm = model.llm
    ours.update({"llm." + k: v for k, v in llm.state_dict().items()
                 if k != "lm_head.weight" or llm.lm_head.weight is not llm.embed_tokens.weight})  # a tied head is not stored
    return {FV.LLAVA.theirs(k, tower.cfg): v.detach().contiguous().clone() for k, v in ours.items()}


def config_dict(model, base=None):
    return FV.llava_config(model.vision_tower.cfg, model.llm.cfg, base)


def load_state(path):
    """training_state.pt, read with torch's weights-only loader (it runs no code); one line if damaged."""
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # a truncated zip, a tampered pickle: torch raises several types
        raise DataError(f"{path} is damaged or not a training state ({type(e).__name__}); start again from the "
                        "checkpoint beside it with --init (without --resume), or from an earlier run") from None


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
    for name, value, low, high, why in counts:
        if value is not None and value < low:
            raise DataError(f"{name} must be at least {low}" + (" (the prompt template alone takes about 25 tokens)"
                                                                 if name == "--max-length" else ""))
        if value is not None and value > high:
            raise DataError(f"{name} must be at most {high:,} ({why})")
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


def clean_leftovers(out):
    """Remove the temporary folders of saves that a crash or a signal interrupted (they hold disk space),
    and a log rewrite's temporary file (trim_log) that a kill left behind."""
    out = Path(out)
    (out / "log.jsonl.tmp").unlink(missing_ok=True)
    if out.parent.is_dir():
        for left in out.parent.glob(f".{out.name}.tmp-*"):
            shutil.rmtree(left, ignore_errors=True)
        for left in out.parent.glob(f".{out.name}.old-*"):
            if out.is_dir():                 # the swap finished: the old copy is garbage
                shutil.rmtree(left, ignore_errors=True)
            else:                            # interrupted between the two renames: put the old one back
                left.rename(out)


def write_failure(e, doing, out):
    """A one-line TrainingError for a write that failed (a full disk, a quota, `ulimit -f`, ...): what
    happened, what to do, and what was kept; None when `e` is no failed write (a bug keeps its traceback)."""
    number = write_errno(e) if isinstance(e, Exception) else None
    if number is None:
        return None
    where = Path(out).parent
    problem, fix = {errno.ENOSPC: (f"no space left on {where}", "free some space"),
                    getattr(errno, "EDQUOT", -1): (f"the disk quota on {where} is used up", "free some space"),
                    errno.EFBIG: (f"a file in {where} outgrew this process's file-size limit (ulimit -f)",
                                  "raise the limit")}.get(number, (f"{where}: {os.strerror(number)}", "fix that"))
    kept = (f" with --resume (the last checkpoint in {out} is intact)" if (Path(out) / STATE).is_file()
            else " (nothing was kept: no checkpoint had been written)")
    return TrainingError(f"{problem} while {doing}; {fix} and rerun{kept}")


def save_checkpoint(out, model, tokenizer, config, state):
    """Write config + safetensors + tokenizer + training state to a temporary folder, then swap it in.
    On any failure the temporary folder is removed and the previous checkpoint stays as it was; a write
    that failed (full disk, quota, file-size limit) becomes one line that says so."""
    out = Path(out)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
        write_safetensors(export_tensors(model), tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        FV.save_tokenizer(tokenizer, tmp)
        with open(tmp / STATE, "wb") as f:   # through a Python file, whose failed write keeps its errno
            torch.save(state, f)
        for extra in ("log.jsonl", "loss.png"):            # keep the run's log beside the newest weights
            if (out / extra).is_file():
                shutil.copy(out / extra, tmp / extra)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        failure = write_failure(e, "saving the checkpoint", out)
        if failure is not None:
            raise failure from None
        raise
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------
# Training.
# ----------------------------------------------------------------------------------------------------

def use_grad_checkpoint(model, bn_train):
    """Activation checkpointing: keep only each block's input and recompute its activations during the
    backward pass (about one more forward of compute for much less activation memory). Every LLM layer,
    and every encoder stage unless the encoder's BatchNorms learn batch statistics (from scratch): a
    recomputation would update their running statistics a second time, so those stages keep their
    activations and the statistics stay exactly those of a run without checkpointing."""
    import functools

    from torch.utils.checkpoint import checkpoint

    blocks = list(model.llm.layers) + ([] if bn_train else list(model.vision_tower.stages))
    for block in blocks:   # an instance attribute shadows the class's forward; names and weights unchanged
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    return len(blocks)


def cosine_with_warmup(step, total, warmup):
    """The learning rate of optimizer step `step` (0-based) as a fraction of the peak: a linear warm-up
    over the first `warmup` steps, reaching the peak at step warmup - 1, then a cosine decay to 0 at step
    `total` (LLaVA-1.5: --warmup_ratio 0.03 --lr_scheduler_type cosine, i.e. transformers'
    get_cosine_schedule_with_warmup). One difference: transformers' warm-up starts at step / warmup, which
    makes the first step a step at lr 0 that updates nothing; here it starts at (step + 1) / warmup.
    Another: the number of warm-up steps is max(1, round(ratio x total)) here (train() computes it),
    math.ceil(ratio x total) in transformers' get_warmup_steps; they differ by one step at most."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def set_trainable(model, stage, bn_train):
    parts, _ = STAGES[stage]
    for name in ("vision_tower", "mm_projector", "llm"):
        module = getattr(model, name)
        learn = name in parts
        module.requires_grad_(learn)
        module.train(learn)
    if not bn_train:   # BatchNorm on running statistics (see the module docstring)
        for m in model.vision_tower.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eval()


@contextlib.contextmanager
def gradient_sync(model, hold):
    """Hold back the gradient all-reduce (DDP) or reduce-scatter (FSDP) while micro-batches accumulate."""
    if not hold:
        yield
    elif hasattr(model, "set_requires_gradient_sync"):                  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        with model.no_sync():
            yield


def shard(model):
    """FSDP2: each LLM layer, each encoder stage and then the rest become units whose parameters,
    gradients and optimizer state live sharded across the processes; a unit's full parameters are
    gathered just for its forward and backward. Names and values of the state dict are unchanged."""
    from torch.distributed.fsdp import fully_shard

    for block in list(model.llm.layers) + list(model.vision_tower.stages):
        fully_shard(block)
    fully_shard(model)
    return model


def full_state(model, optimizer):
    """Every process's shards gathered into the full model and optimizer state, on rank 0's CPU (all
    processes must call it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def for_loss(logits):
    """Logits as the loss reads them: bf16 (autocast) upcast to float32; float64 kept (exact comparisons)."""
    return logits if logits.dtype == torch.float64 else logits.float()


def step_loss(model, batches, average, world):
    """Run forward/backward over the micro-batches of one optimizer step; returns the mean loss.

    The loss is normalised by the *global* number of answer tokens ("token") or of samples ("sample")
    in the whole step, counted across accumulation steps and processes, so any split of the global
    batch into processes and micro-batches gives the same gradient.
    """
    def count(labels):
        valid = labels[:, 1:] != -100
        return valid.sum() if average == "token" else (valid.sum(1) > 0).sum()

    total = torch.stack([count(l) for _, _, l in batches]).sum().float()
    if world > 1:
        dist.all_reduce(total)
    total = total.clamp(min=1)
    loss_value = 0.0
    for i, (pixels, ids, labels) in enumerate(batches):
        sync = i == len(batches) - 1
        with gradient_sync(model, world > 1 and not sync):
            logits, spread = model(pixels, ids, labels)
            ce = F.cross_entropy(for_loss(logits[:, :-1].flatten(0, 1)), spread[:, 1:].flatten(),
                                 ignore_index=-100, reduction="none").view(spread.shape[0], -1)
            if average == "token":
                loss_sum = ce.sum()
            else:
                n = (spread[:, 1:] != -100).sum(1)
                loss_sum = (ce.sum(1) / n.clamp(min=1)).sum()
            (loss_sum * world / total).backward()
        loss_value += loss_sum.item()
    reported = torch.tensor(loss_value, dtype=torch.float64)
    if world > 1:
        dist.all_reduce(reported)
    return (reported / total).item()


def short_answer(turns):
    """(question, answer) of a conversation's first exchange when the answer is at most 8 words, else
    None: those are scored by exact match (longer answers have many right wordings; later turns would
    need the earlier reference answers in the prompt)."""
    if len(turns[1]["value"].split()) <= 8:
        return turns[0]["value"].replace(FV.IMAGE, "").strip(), turns[1]["value"].strip()
    return None


@torch.no_grad()
def evaluate(core, tokenizer, records, image_size, max_length, batch_size, device):
    """Loss per answer token on held-out records (the training loss, in eval mode, no update) and the
    exact-match rate of greedy answers to their first questions, where the answer is short (None when
    no record has one)."""
    modes = [m.training for m in core.modules()]
    core.eval()
    try:
        dataset = Dataset(records, None, tokenizer, image_size, max_length)
        total, tokens = 0.0, 0
        for start in range(0, len(dataset), batch_size):
            pixels, ids, labels = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))], 0)
            logits, spread = core(None if pixels is None else pixels.to(device), ids.to(device), labels.to(device))
            total += F.cross_entropy(for_loss(logits[:, :-1].flatten(0, 1)), spread[:, 1:].flatten(),
                                     ignore_index=-100, reduction="sum").item()
            tokens += (spread[:, 1:] != -100).sum().item()
        right = asked = 0
        for r in records:
            qa = short_answer(r["conversations"])
            if qa is None or r["image"] is None:
                continue
            chat = FV.Chat(core, tokenizer, FV.load_image(r["folder"] / r["image"]))
            right += chat.ask(qa[0], max_new_tokens=24).lower() == qa[1].lower()
            asked += 1
        core.llm.drop_cache()                       # the cache is inference's; training runs without one
    finally:
        for m, mode in zip(core.modules(), modes):
            m.training = mode
    return total / max(1, tokens), (right / asked if asked else None), asked


def plot_losses(log_path, png_path=None):
    """The training loss of every stage in `log_path` against the step, as a matplotlib Figure (saved to
    `png_path` if given). Object-oriented matplotlib, no pyplot: it never switches the backend of the
    program that calls it (a notebook's inline plots keep working)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("(matplotlib not installed: no loss plot; pip install matplotlib)", file=sys.stderr)
        return None
    rows = [json.loads(l) for l in Path(log_path).read_text().splitlines() if l.strip()]
    fig = Figure(figsize=(6, 3.2))
    ax = fig.subplots()
    for stage in sorted({r["stage"] for r in rows}):
        pts = [(r["global_step"], r["loss"]) for r in rows if r["stage"] == stage and "loss" in r]
        if pts:
            ax.plot(*zip(*pts), label=f"stage {stage}", lw=1)
    held_out = [(r["global_step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if held_out:
        ax.plot(*zip(*held_out), "o-", ms=3, lw=1, color="black", label="held-out (--eval-data)")
    ax.set_title("FastVLM training loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (cross-entropy per answer token, nats)")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    if png_path is not None:
        fig.savefig(png_path, dpi=100)
    return fig


def build_parser():
    """The command line; every option's help gives its default."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=sorted(STAGES), required=True,
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
                   + ", ".join(f"{stage} {lr:g}" for stage, (_, lr) in STAGES.items()) + ")")
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
    return p


def parse_args(argv):
    return build_parser().parse_args(argv)


def trim_log(path, last, out):
    """On --resume: keep the log rows up to global step `last`, the checkpoint's. A run that stopped
    after logging steps it did not save (killed, a failed save) logs them again when resumed; a line cut
    short by a kill goes too. Rewritten whole and swapped in, only when something must go; a rewrite
    that fails (a full disk) is one line, and the log stays as it was, with no temporary file beside it."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not (isinstance(row, dict) and isinstance(row.get("global_step"), int) and row["global_step"] > last):
            kept.append(line)
    if kept != lines:
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise (write_failure(e, f"trimming {path}", out) or e) from None


def gpu_memory(device):
    """{"peak_gpu_mib": ...} on CUDA (the most this process's tensors have held on its GPU), else {}."""
    if device.type != "cuda":
        return {}
    return {"peak_gpu_mib": round(torch.cuda.max_memory_allocated(device) / 2**20)}


def main(argv=None):
    args = parse_args(argv)
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    try:
        return train(args, world, rank)
    except (DataError, CheckpointError, FV.InputError, TrainingError) as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@torch.enable_grad()            # whatever the caller's grad mode (a notebook or a test may have turned it off)
def train(args, world, rank):
    check_arguments(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and device.type != "cuda":
        raise DataError("--device cuda: CUDA is not available on this machine")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
    out = Path(args.out)
    if args.resume and not (out / STATE).is_file():
        raise DataError(f"--resume: {out / STATE} not found; start without --resume")
    if args.fsdp and world < 2:
        raise DataError("--fsdp shards the model across processes: launch with torchrun --nproc_per_node N (N >= 2)")
    if args.fsdp and args.eval_data:
        raise DataError("--eval-data is not supported with --fsdp yet; evaluate the checkpoint afterwards")
    if args.workers:            # the tokenizer's own threads and forked workers do not mix (it would warn)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    clean_leftovers(out)
    records, summary, counts = load_datasets(args.data, args.images, args.skip_missing_images)
    held_out = load_datasets(args.eval_data, [args.eval_images or args.images[0]])[0] if args.eval_data else None
    per_step, steps_per_epoch, total_steps = plan_steps(args, len(records), world)   # before the model loads
    torch.manual_seed(args.seed)

    if args.resume:
        state = load_state(out / STATE)
        if state["stage"] != args.stage:
            raise DataError(f"--resume: {out} is a stage {state['stage']} run, not stage {args.stage}")
        model, tokenizer = model_from_state(state, out)
        from_scratch = not state["fused"]
        base_config = FV.read_config(out)
        trim_log(out / "log.jsonl", state.get("prior_steps", 0) + state["step"], out)
    else:
        if out.exists() and any(out.iterdir()):
            raise DataError(f"{out} exists and is not empty; choose a new --out or pass --resume")
        model, tokenizer, from_scratch, init_steps = initialise(args, records)
        base_config = FV.read_config(args.init) if (args.init and args.init != "scratch") else {}
        state = None
    model.to(device)
    bn_train = {"auto": from_scratch, "train": True, "eval": False}[args.bn]
    bn_train = bn_train and "vision_tower" in STAGES[args.stage][0]          # a frozen encoder runs in eval
    set_trainable(model, args.stage, bn_train)
    checkpointed = use_grad_checkpoint(model, bn_train) if args.grad_checkpoint else 0
    if world > 1 and bn_train and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    core = model
    if world > 1 and args.fsdp:
        model = core = shard(core)
    elif world > 1:
        # A micro-batch of text-only records leaves the vision tower unused, which DDP must be told.
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                          find_unused_parameters=counts["text-only"] > 0)

    dataset = Dataset(records, None, tokenizer, core.image_size, args.max_length)
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                                  seed=args.seed, drop_last=True)
    assert len(sampler) == len(records) // world            # what plan_steps counted with
    image_sizes = parse_sizes(args.image_sizes, core.vision_tower.cfg) if args.image_sizes else (
        state.get("image_sizes") if state is not None and state.get("image_sizes") else [core.image_size])
    params = [p for p in core.parameters() if p.requires_grad]
    lr = args.lr if args.lr is not None else STAGES[args.stage][1]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
    warmup = max(1, round(args.warmup * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_with_warmup(s, total_steps, warmup))
    step, prior_steps = 0, 0
    if state is not None:
        if state.get("optimizer_format", "plain") != ("fsdp" if args.fsdp else "plain"):
            raise DataError(f"--resume: {out} was trained {'with' if not args.fsdp else 'without'} --fsdp; resume it "
                            "the same way, or start a new run from it with --init")
        if args.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(core, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        step, prior_steps = state["step"], state.get("prior_steps", 0)
    else:
        prior_steps = init_steps            # the steps of the run --init continues (0 for a new model)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    pad_id = tokenizer.token_id("<|endoftext|>") or 0

    progress = None

    def announce():
        """Once the first batch has loaded (bad data fails before anything is printed or written)."""
        nonlocal progress
        if rank != 0:
            return
        out.mkdir(parents=True, exist_ok=True)
        previous_log = Path(args.init or "") / "log.jsonl"
        if state is None and args.init not in (None, "scratch") and previous_log.is_file():
            try:                                           # one log (and loss curve) across the stages
                shutil.copy(previous_log, out / "log.jsonl")
            except OSError as e:
                raise (write_failure(e, f"copying {previous_log}", out) or e) from None
        trainable = sum(p.numel() for p in params)
        print(summary, file=sys.stderr)
        n = torch.get_num_threads()      # shown when chosen: --threads (else torch's default, machine-dependent)
        threads = f" ({n} thread{'s' if n > 1 else ''})" if args.threads and device.type == "cpu" else ""
        print(f"stage {args.stage}: training {trainable:,} of {sum(p.numel() for p in core.parameters()):,} "
              f"parameters, {total_steps} steps of {per_step * world} samples, lr {lr:g}, {world} process(es) "
              f"on {device.type}{threads}, encoder in {'training' if from_scratch else 'fused'} form, "
              f"BatchNorm {'train' if bn_train else 'eval'}"
              + (f", activation checkpointing in {checkpointed} blocks" if checkpointed else ""), file=sys.stderr)
        if not args.no_progress:
            from tqdm import tqdm
            progress = tqdm(total=total_steps, initial=step, desc=f"stage {args.stage}", dynamic_ncols=True)

    stop_at = min(total_steps, args.stop_after) if args.stop_after else total_steps

    def interrupted():
        """Ctrl-C: save what the finished steps learnt (resumable), say where, exit 130."""
        if step > 0:
            checkpoint()
            if rank == 0:
                print(f"interrupted: step {step} is saved in {out}; continue with --resume", file=sys.stderr)
        elif rank == 0:
            print("interrupted before the first step; nothing was written", file=sys.stderr)
        raise KeyboardInterrupt

    def make_state(model_state=None, optimizer_state=None):
        return {"model": model_state or core.state_dict(), "optimizer": optimizer_state or optimizer.state_dict(),
                "optimizer_format": "fsdp" if args.fsdp else "plain", "scheduler": scheduler.state_dict(),
                "rng": torch.get_rng_state(), "step": step, "prior_steps": prior_steps, "stage": args.stage,
                "fused": not from_scratch,        # training form from scratch, official (fused) form otherwise
                "vision_cfg": asdict(core.vision_tower.cfg), "llm_cfg": asdict(core.llm.cfg), "seed": args.seed,
                "image_sizes": image_sizes, "decode_failed": sorted(decode_failed)}

    def append_log(row):
        """One row of log.jsonl (reopened each time: a checkpoint swaps the folder); a failed write is one line."""
        try:
            with open(out / "log.jsonl", "a") as log:
                log.write(json.dumps(row) + "\n")
        except OSError as e:
            raise (write_failure(e, f"writing {out / 'log.jsonl'}", out) or e) from None

    def run_eval():
        """Held-out loss and exact match, logged beside the training loss (rank 0; the others wait)."""
        if rank == 0:
            core.vision_tower.cfg = replace(core.vision_tower.cfg, image_size=image_size[0])
            loss, exact, asked = evaluate(core, tokenizer, held_out, image_size[0], args.max_length,
                                          args.batch_size, device)
            append_log({"stage": args.stage, "step": step, "global_step": prior_steps + step, "eval_loss": loss,
                        "eval_exact": exact, "eval_asked": asked})
            shown = "" if exact is None else f", exact match {exact:.1%} of {asked} short answers"
            (progress.write if progress is not None else lambda m: print(m, file=sys.stderr))(
                f"step {step}: held-out loss {loss:.4f}{shown}")
        if world > 1:
            dist.barrier()

    def checkpoint():
        # the size trained at last is the checkpoint's size (its config's `mobileclip_l_<size>`)
        core.vision_tower.cfg = replace(core.vision_tower.cfg, image_size=image_size[0])
        if args.fsdp:   # gather the shards; rank 0 writes them from a plain model, as without FSDP
            model_state, optimizer_state = full_state(core, optimizer)
        if rank == 0:
            if args.fsdp:
                with torch.device("meta"):
                    plain = FV.FastVLM(core.vision_tower.cfg, core.llm.cfg, fused=not from_scratch)
                plain = FV.allocate(plain)
                plain.load_state_dict(model_state)
                save_checkpoint(out, plain, tokenizer, config_dict(plain, base_config),
                                make_state(model_state, optimizer_state))
            else:
                save_checkpoint(out, core, tokenizer, config_dict(core, base_config), make_state())
            if (out / "log.jsonl").is_file():
                try:
                    plot_losses(out / "log.jsonl", out / "loss.png")
                except OSError as e:        # the plot is a convenience; the checkpoint beside it is complete
                    (out / "loss.png").unlink(missing_ok=True)
                    print(f"note: {out / 'loss.png'} not written ({os.strerror(e.errno) if e.errno else e})",
                          file=sys.stderr)
        if world > 1:
            dist.barrier()

    announced, truncated = False, [0]
    # records whose image passed the check at the start but failed to decode (--skip-missing-images): a
    # set, since such a record comes round again every epoch
    decode_failed = set(state.get("decode_failed", [])) if state is not None else set()
    plan = {"grad_accum": args.grad_accum, "batch_size": args.batch_size, "per_step": per_step,
            "steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "image_sizes": image_sizes}
    image_size = [size_at(step, total_steps, image_sizes)]

    def train_loop():
        nonlocal step, announced
        loader = torch.utils.data.DataLoader(
            StepBatches(dataset, sampler, plan, step, stop_at, pad_id, args.skip_missing_images), batch_size=None,
            num_workers=args.workers, pin_memory=device.type == "cuda", prefetch_factor=4 if args.workers else None)
        batches_ahead = iter(loader)
        try:
            while step < stop_at:
                t_data = time.perf_counter()
                micro = [next(batches_ahead) for _ in range(args.grad_accum)]
                failed = next((m["error"] for m in micro if "error" in m), None)
                if failed:                  # an image that passed the check at the start but will not decode
                    if step > 0:
                        checkpoint()
                    raise DataError(f"{failed}; fix the image or pass --skip-missing-images, then rerun"
                                    + (f" with --resume (step {step} is saved in {out})" if step > 0 else ""))
                decode_failed.update(i for m in micro for i in m["skipped"])
                truncated[0] += sum(m["truncated"] for m in micro)
                image_size[0] = micro[0]["image_size"]
                batches = [m["batch"] for m in micro]
                batches = [tuple(None if t is None else t.to(device, non_blocking=True) for t in b) for b in batches]
                if not announced:
                    announce()
                    announced = True
                t0 = time.perf_counter()
                with autocast:
                    loss = step_loss(model, batches, args.loss_average, world)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, args.clip)
                grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()
                if not (math.isfinite(loss) and math.isfinite(grad_norm)):   # nothing to learn from: keep what was good
                    kept = f"the last checkpoint in {out} is from before it" if (out / STATE).is_file() else "no checkpoint was written"
                    raise TrainingError(f"the loss or the gradient norm became non-finite at step {step + 1} (lr "
                                        f"{scheduler.get_last_lr()[0]:g}); {kept}; lower --lr")
                lr_used = scheduler.get_last_lr()[0]         # this step's, logged beside its loss
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                step += 1
                compute_s = time.perf_counter() - t0
                rate = per_step * world / (time.perf_counter() - t_data)     # data time included
                if rank == 0:
                    append_log({"stage": args.stage, "step": step, "global_step": prior_steps + step,
                                "epoch": (step - 1) // steps_per_epoch, "loss": loss, "lr": lr_used,
                                "grad_norm": grad_norm, "samples_per_s": rate, "data_s": t0 - t_data,
                                "compute_s": compute_s, "image_size": image_size[0], **gpu_memory(device)})
                    if progress is not None:
                        progress.update(1)
                        progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr_used:.2e}", samples_s=f"{rate:.1f}")
                if held_out and args.eval_every and step % args.eval_every == 0 and step < total_steps:
                    run_eval()
                if args.save_every and step % args.save_every == 0 and step < stop_at:
                    checkpoint()
        except KeyboardInterrupt:
            interrupted()

    # A new run that fails before its first checkpoint (bad data mid-run, a NaN, a full disk at the final
    # save, Ctrl-C) leaves --out as it found it: absent, or empty. A log.jsonl alone would block both a
    # rerun (the folder is not empty) and --resume (there is no state).
    existed = out.exists()
    try:
        train_loop()
        if progress is not None:
            progress.close()
        if held_out and step == total_steps:
            run_eval()
        checkpoint()
    except BaseException:
        if state is None and rank == 0 and not (out / STATE).is_file():
            shutil.rmtree(out, ignore_errors=True)
            if existed:
                out.mkdir()
        raise
    if world > 1 and args.skip_missing_images:       # each process met its own share of the records
        shares = [None] * world
        dist.all_gather_object(shares, sorted(decode_failed))
        decode_failed.update(i for share in shares for i in share)
    if rank == 0:
        if truncated[0]:
            print(f"note: {truncated[0]} samples were longer than --max-length {args.max_length} "
                  "and were truncated", file=sys.stderr)
        left_out = counts["images skipped"] + len(decode_failed)
        if left_out:   # the records, each once: the start's "images skipped" plus those that failed later
            why = ([f"{counts['images skipped']} skipped at the start (image missing or unreadable)"]
                   if counts["images skipped"] else [])
            why += [f"{len(decode_failed)} whose image failed to decode during training"] if decode_failed else []
            print(f"note: {left_out} records were left out: {' and '.join(why)}", file=sys.stderr)
        print(f"wrote {out} (step {step} of {total_steps})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
