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
import json
import math
import os
import shutil
import sys
import time
import uuid
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import fastvlm as FV
import qwen2
import repmixer
from checkpoint import CheckpointError

# The tiny model's architecture: FastViTHD's structure (5 stages, RepMixer then attention, final
# expansion) at 256 px -> 4 x 4 = 16 visual tokens, and a 4-layer Qwen2. About 1.2 M parameters.
TINY_VISION = repmixer.FastViTHDConfig(depths=(1, 1, 1, 1, 1), widths=(8, 16, 32, 64, 128), head_dim=16,
                                       image_size=256)
TINY_LLM = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True)
TINY_VOCAB = 384

STAGES = {  # which parts learn, and the paper's learning rate
    "0": (("vision_tower", "mm_projector", "llm"), 1e-3),   # from scratch only: see the docstring
    "1": (("mm_projector",), 1e-3),
    "1.5": (("vision_tower", "mm_projector"), 2e-5),
    "2": (("vision_tower", "mm_projector", "llm"), 2e-5),
}
STATE = "training_state.pt"


class DataError(ValueError):
    """A problem with the training data; the message names the file and the record."""


# ----------------------------------------------------------------------------------------------------
# Data.
# ----------------------------------------------------------------------------------------------------

def load_records(data_path, image_folder=None):
    """Read and validate a LLaVA-format JSON list; every problem names the record (images are checked
    when their folder is given)."""
    data_path = Path(data_path)
    if not data_path.is_file():
        raise DataError(f"data file not found: {data_path}")
    try:
        records = json.loads(data_path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{data_path} is not valid JSON ({e})") from None
    if not isinstance(records, list) or not records:
        raise DataError(f"{data_path} must hold a non-empty JSON list of records")
    for i, r in enumerate(records):
        where = f"{data_path} record {i}" + (f" (id {r.get('id')!r})" if isinstance(r, dict) and "id" in r else "")
        if not isinstance(r, dict) or "image" not in r or "conversations" not in r:
            raise DataError(f"{where}: needs 'image' and 'conversations'")
        turns = r["conversations"]
        if not isinstance(turns, list) or not all(isinstance(t, dict) and t.get("from") in ("human", "gpt")
                                                  and isinstance(t.get("value"), str) for t in turns):
            raise DataError(f"{where}: conversations must be a list of {{'from': 'human'|'gpt', 'value': str}}")
        if not any(t["from"] == "gpt" for t in turns):
            raise DataError(f"{where}: the conversation has no assistant ('gpt') turn to learn from")
        if turns[0]["from"] != "human" or any(a["from"] == b["from"] for a, b in zip(turns, turns[1:])):
            raise DataError(f"{where}: turns must alternate human, gpt, human, ... starting with human")
        later = [k for k, t in enumerate(turns) if k > 0 and FV.IMAGE in t["value"]]
        if later:
            raise DataError(f"{where}: turn {later[0]} holds an '{FV.IMAGE}' marker; one image per conversation, "
                            "marked in the first human turn only")
        if image_folder is not None and not (Path(image_folder) / r["image"]).is_file():
            raise DataError(f"{where}: image {Path(image_folder) / r['image']} not found")
    return records


def tokenize_conversation(tokenizer, turns):
    """ids (with IMAGE_TOKEN_INDEX) and labels (-100 except on each answer and its <|im_end|>)."""
    ids, labels = [], []

    def add(text, learn):
        piece = FV.tokenize_with_image(tokenizer, text)
        ids.extend(piece)
        labels.extend(piece if learn else [-100] * len(piece))

    add(FV.SYSTEM, False)
    for i, t in enumerate(turns):
        value = t["value"]
        if t["from"] == "human":
            if i == 0:   # the image goes first in the first user turn, as in LLaVA
                value = FV.IMAGE + "\n" + value.replace(FV.IMAGE, "").strip()
            add(FV.USER + value + FV.END + FV.ASSISTANT, False)
        else:
            add(value + FV.END.rstrip("\n"), True)   # the answer and <|im_end|> are learnt ...
            add("\n", False)                         # ... the newline after it is template
    return ids, labels


class Dataset(torch.utils.data.Dataset):
    def __init__(self, records, image_folder, tokenizer, image_size, max_length):
        self.records, self.folder = records, Path(image_folder)
        self.tokenizer, self.image_size, self.max_length = tokenizer, image_size, max_length
        self.truncated = 0

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        r = self.records[i]
        try:
            image = FV.load_image(self.folder / r["image"])
        except FV.InputError as e:
            raise DataError(f"record {i} (id {r.get('id')!r}): {e}") from None
        ids, labels = tokenize_conversation(self.tokenizer, r["conversations"])
        if len(ids) > self.max_length:     # truncate (and count), as LLaVA does at model_max_length
            ids, labels = ids[:self.max_length], labels[:self.max_length]
            self.truncated += 1
        return FV.preprocess(image, self.image_size), torch.tensor(ids), torch.tensor(labels)


def collate(items, pad_id):
    pixels = torch.stack([p for p, _, _ in items])
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
    """(model, tokenizer, trained-from-scratch?) as --init / --init-llm / --init-vision ask."""
    if args.init == "scratch":
        corpus = records
        for extra in args.tokenizer_data or []:
            corpus = corpus + load_records(extra)
        model, tokenizer = build_scratch(corpus)
        return model, tokenizer, True
    if args.init:
        folder = Path(args.init)
        if (folder / STATE).is_file():
            state = torch.load(folder / STATE, weights_only=True)
            model, tokenizer = model_from_state(state, folder)
            return model, tokenizer, not state["fused"]
        model, tokenizer, _ = FV.FastVLM.from_pretrained(folder, fold_batchnorm=False)
        return model, tokenizer, False
    if args.init_llm and args.init_vision:
        llm = FV.load_qwen2(args.init_llm)
        vlm, _, config = FV.FastVLM.from_pretrained(args.init_vision, fold_batchnorm=False)
        model = FV.FastVLM(vlm.vision_tower.cfg, llm.cfg, fused=True)
        model.vision_tower, model.llm = vlm.vision_tower, llm
        return model, FV.load_tokenizer(args.init_llm), False
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


def save_checkpoint(out, model, tokenizer, config, state):
    """Write config + safetensors + tokenizer + training state to a temporary folder, then swap it in."""
    from safetensors.torch import save_file

    out = Path(out)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    save_file(export_tensors(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    FV.save_tokenizer(tokenizer, tmp)
    torch.save(state, tmp / STATE)
    for extra in ("log.jsonl", "loss.png"):            # keep the run's log beside the newest weights
        if (out / extra).is_file():
            shutil.copy(out / extra, tmp / extra)
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------
# Training.
# ----------------------------------------------------------------------------------------------------

def cosine_with_warmup(step, total, warmup):
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
        ctx = model.no_sync() if (world > 1 and not sync) else contextlib.nullcontext()
        with ctx:
            logits, spread = model(pixels, ids, labels)
            ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), spread[:, 1:].flatten(),
                                 ignore_index=-100, reduction="none").view(spread.shape[0], -1)
            if average == "token":
                loss_sum = ce.sum()
            else:
                n = (spread[:, 1:] != -100).sum(1)
                loss_sum = (ce.sum(1) / n.clamp(min=1)).sum()
            (loss_sum * world / total).backward()
        loss_value += loss_sum.item()
    reported = torch.tensor(loss_value)
    if world > 1:
        dist.all_reduce(reported)
    return (reported / total).item()


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
        pts = [(r["global_step"], r["loss"]) for r in rows if r["stage"] == stage]
        ax.plot(*zip(*pts), label=f"stage {stage}", lw=1)
    ax.set_title("FastVLM training loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (cross-entropy, nats)")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    if png_path is not None:
        fig.savefig(png_path, dpi=100)
    return fig


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=sorted(STAGES), required=True)
    p.add_argument("--data", required=True, help="LLaVA-format JSON")
    p.add_argument("--images", required=True, help="folder the records' image paths are relative to")
    p.add_argument("--out", required=True, help="output folder (a FastVLM checkpoint + training state)")
    p.add_argument("--init", help="FOLDER to fine-tune or continue, or 'scratch' for a tiny model")
    p.add_argument("--init-llm", help="HF Qwen2 folder for the language model (with --init-vision)")
    p.add_argument("--init-vision", help="FastVLM folder whose vision tower to use (with --init-llm)")
    p.add_argument("--tokenizer-data", nargs="*", help="with --init scratch: more LLaVA JSONs whose texts the "
                   "tokenizer is trained on (the data of later stages), besides --data")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its training state")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the paper's for the stage)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--steps", type=int, help="optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=16, help="per process, per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--warmup", type=float, default=0.03, help="fraction of steps with linear warm-up")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--clip", type=float, default=1.0, help="max gradient norm")
    p.add_argument("--loss-average", choices=["token", "sample"], default="token",
                   help="normalise by answer tokens (LLaVA) or give every sample equal weight")
    p.add_argument("--max-length", type=int, default=2048, help="longer samples are truncated and counted")
    p.add_argument("--bn", choices=["auto", "train", "eval"], default="auto",
                   help="BatchNorm statistics in the encoder: auto = train from scratch, eval when fine-tuning")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=0, help="also checkpoint every N steps")
    p.add_argument("--stop-after", type=int, help="stop (with a checkpoint) after N steps, for --resume")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    try:
        return train(args, world, rank)
    except (DataError, CheckpointError, FV.InputError) as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@torch.enable_grad()            # whatever the caller's grad mode (a notebook or a test may have turned it off)
def train(args, world, rank):
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
    records = load_records(args.data, args.images)
    torch.manual_seed(args.seed)

    if args.resume:
        state = torch.load(out / STATE, weights_only=True)
        if state["stage"] != args.stage:
            raise DataError(f"--resume: {out} is a stage {state['stage']} run, not stage {args.stage}")
        model, tokenizer = model_from_state(state, out)
        from_scratch = not state["fused"]
        base_config = FV.read_config(out)
    else:
        if out.exists() and any(out.iterdir()):
            raise DataError(f"{out} exists and is not empty; choose a new --out or pass --resume")
        model, tokenizer, from_scratch = initialise(args, records)
        base_config = FV.read_config(args.init) if (args.init and args.init != "scratch") else {}
        state = None
    model.to(device)
    bn_train = {"auto": from_scratch, "train": True, "eval": False}[args.bn]
    bn_train = bn_train and "vision_tower" in STAGES[args.stage][0]          # a frozen encoder runs in eval
    set_trainable(model, args.stage, bn_train)
    if world > 1 and bn_train and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    core = model
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    dataset = Dataset(records, args.images, tokenizer, core.image_size, args.max_length)
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                                  seed=args.seed, drop_last=True)
    per_step = args.batch_size * args.grad_accum            # samples per process per optimizer step
    steps_per_epoch = len(sampler) // per_step
    if steps_per_epoch == 0:
        raise DataError(f"{args.data}: {len(records)} records are fewer than one global batch "
                        f"({per_step * world}); lower --batch-size or --grad-accum")
    total_steps = args.steps or max(1, int(args.epochs * steps_per_epoch))
    params = [p for p in core.parameters() if p.requires_grad]
    lr = args.lr if args.lr is not None else STAGES[args.stage][1]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
    warmup = max(1, round(args.warmup * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_with_warmup(s, total_steps, warmup))
    step, prior_steps = 0, 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        step, prior_steps = state["step"], state.get("prior_steps", 0)
    elif args.init and args.init != "scratch" and (Path(args.init) / STATE).is_file():
        prior = torch.load(Path(args.init) / STATE, weights_only=True)
        prior_steps = prior.get("prior_steps", 0) + prior["step"]
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
            shutil.copy(previous_log, out / "log.jsonl")   # one log (and loss curve) across the stages
        trainable = sum(p.numel() for p in params)
        print(f"stage {args.stage}: training {trainable:,} of {sum(p.numel() for p in core.parameters()):,} "
              f"parameters, {total_steps} steps of {per_step * world} samples, lr {lr:g}, {world} process(es) "
              f"on {device.type}, encoder in {'training' if from_scratch else 'fused'} form, "
              f"BatchNorm {'train' if bn_train else 'eval'}", file=sys.stderr)
        if not args.no_progress:
            from tqdm import tqdm
            progress = tqdm(total=total_steps, initial=step, desc=f"stage {args.stage}", dynamic_ncols=True)

    stop_at = min(total_steps, args.stop_after) if args.stop_after else total_steps

    def make_state():
        return {"model": core.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": torch.get_rng_state(), "step": step, "prior_steps": prior_steps, "stage": args.stage,
                "fused": not from_scratch,        # training form from scratch, official (fused) form otherwise
                "vision_cfg": asdict(core.vision_tower.cfg), "llm_cfg": asdict(core.llm.cfg), "seed": args.seed}

    def checkpoint():
        if rank == 0:
            save_checkpoint(out, core, tokenizer, config_dict(core, base_config), make_state())
            plot_losses(out / "log.jsonl", out / "loss.png") if (out / "log.jsonl").is_file() else None
        if world > 1:
            dist.barrier()

    order, order_epoch, announced = None, None, False
    while step < stop_at:
        epoch, position = divmod(step, steps_per_epoch)
        if epoch != order_epoch:                      # this process's share of the epoch's permutation
            sampler.set_epoch(epoch)
            order, order_epoch = list(sampler), epoch
        start = position * per_step
        chunk = order[start:start + per_step]
        batches = [collate([dataset[i] for i in chunk[j:j + args.batch_size]], pad_id)
                   for j in range(0, per_step, args.batch_size)]
        batches = [tuple(t.to(device) for t in b) for b in batches]
        if not announced:
            announce()
            announced = True
        t0 = time.perf_counter()
        with autocast:
            loss = step_loss(model, batches, args.loss_average, world)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.clip).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        rate = per_step * world / (time.perf_counter() - t0)
        if rank == 0:
            lr_now = scheduler.get_last_lr()[0]
            with open(out / "log.jsonl", "a") as log:   # reopened: a checkpoint swaps the folder
                log.write(json.dumps({"stage": args.stage, "step": step, "global_step": prior_steps + step,
                                      "epoch": epoch, "loss": loss, "lr": lr_now, "grad_norm": grad_norm,
                                      "samples_per_s": rate}) + "\n")
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr_now:.2e}", samples_s=f"{rate:.1f}")
        if args.save_every and step % args.save_every == 0 and step < stop_at:
            checkpoint()
    if progress is not None:
        progress.close()
    checkpoint()
    if rank == 0:
        if dataset.truncated:
            print(f"note: {dataset.truncated} samples were longer than --max-length {args.max_length} "
                  "and were truncated", file=sys.stderr)
        print(f"wrote {out} (step {step} of {total_steps})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
