"""A training run's folder and processes, for train.py: everything around its loop that talks to files,
devices and other processes.

    run = Run(args, world, rank, STAGES, answer_loss)   # the device, the processes, the data, the model:
                                            # new, --init or --resume; bad options and data fail first
    model = run.distribute(set_trainable)   # what the stage trains; activation checkpointing, DDP or FSDP
    run.start(optimizer, scheduler)         # registers them; --resume: optimizer, schedule, RNG and step
    with run.guard():                       # Ctrl-C saves; a new run that fails leaves --out as it found it
        for batches in run.steps():         # one optimizer step's micro-batches, on the device
            ...                             # (train.py: forward, loss, backward)
            run.check_finite(loss, grad_norm)    # a NaN stops the run, keeping the last good checkpoint
            ...                             # (train.py: the optimizer's step)
            run.step_done(loss, lr, grad_norm)   # the log, the progress bar, evaluation, periodic saves
        run.finish()                        # the last evaluation and checkpoint
    run.report()                            # what was truncated or left out, and where the model is

Checkpoints are written fused, in the official layout (what support/loading.py and infer.py read), to a
temporary folder swapped in whole; training_state.pt beside them keeps the training-form weights, the
optimizer, scheduler, step, RNG and data position, so that --resume (and a later stage's --init)
continue exactly.
"""

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

import fastvlm as FV
import qwen2
import repmixer
from support import adapters, loading, speedups
from support.chat import Chat, InputError, load_image
from support.checkpoint import CheckpointError, write_errno, write_safetensors
from support.llava_data import Dataset, StepBatches, collate, load_datasets, load_records, size_at
from support.options import DataError, check_arguments, parse_sizes, plan_steps
from support.tokenizer import train_tokenizer

# The tiny model's architecture: FastViTHD's structure (5 stages, RepMixer then attention, final
# expansion) at 256 px -> 4 x 4 = 16 visual tokens, and a 4-layer Qwen2. About 1.2 M parameters.
TINY_VISION = repmixer.FastViTHDConfig(depths=(1, 1, 1, 1, 1), widths=(8, 16, 32, 64, 128), head_dim=16,
                                       image_size=256)
TINY_LLM = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True)
TINY_VOCAB = 384


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss, a full disk); the message says what was kept."""


STATE = "training_state.pt"


def build_scratch(records):
    """The tiny model, and a tokenizer trained on the template and every text of `records`."""
    template = FV.START + "system\n" + FV.SYSTEM_PROMPT + FV.END + FV.USER + FV.ASSISTANT
    texts = [template] + [t["value"] for r in records for t in r["conversations"]]
    tokenizer = train_tokenizer(texts, TINY_VOCAB)
    llm_cfg = qwen2.Qwen2Config(vocab_size=len(tokenizer), **TINY_LLM)
    model = FV.FastVLM(TINY_VISION, llm_cfg, fused=False)
    model.llm.init_weights()
    return model, tokenizer


def model_from_state(state, tokenizer_folder):
    vision_cfg = repmixer.FastViTHDConfig.from_dict(state["vision_cfg"])
    model = FV.FastVLM(vision_cfg, qwen2.Qwen2Config.from_dict(state["llm_cfg"]), fused=state["fused"])
    model.load_state_dict(state["model"])
    return model, loading.load_tokenizer(tokenizer_folder)


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
    folder = Path(args.init or "")
    if args.init and (folder / adapters.CONFIG).is_file() and not (folder / "config.json").is_file():
        base = adapters.read_adapter_config(folder).get("base_model_name_or_path")
        raise DataError(f"{folder} holds LoRA adapters (for {base}), not a model: continue it with --resume, "
                        f"start from its base with --init {base} --lora R, or write a merged model with --merge")
    if args.init and args.lora:         # the base as infer.py reads it: its files, whatever run made them
        model, tokenizer, _ = loading.load_model(args.init, fold_batchnorm=False)
        return model, tokenizer, False, 0
    if args.init:
        state = load_state(folder / STATE) if (folder / STATE).is_file() else None
        if state is not None and not state.get("lora"):     # a LoRA run's state holds its adapters alone
            model, tokenizer = model_from_state(state, folder)
            return model, tokenizer, not state["fused"], state.get("prior_steps", 0) + state["step"]
        model, tokenizer, _ = loading.load_model(folder, fold_batchnorm=False)
        return model, tokenizer, False, 0
    if args.init_llm and args.init_vision:
        llm = loading.load_qwen2(args.init_llm)
        vlm, _, config = loading.load_model(args.init_vision, fold_batchnorm=False)
        model = FV.FastVLM(vlm.vision_tower.cfg, llm.cfg, fused=True)
        model.vision_tower, model.llm = vlm.vision_tower, llm
        return model, loading.load_tokenizer(args.init_llm), False, 0
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
    return {loading.LLAVA.theirs(k, tower.cfg): v.detach().contiguous().clone() for k, v in ours.items()}


def config_dict(model, base=None):
    return loading.llava_config(model.vision_tower.cfg, model.llm.cfg, base)


def load_state(path):
    """training_state.pt, read with torch's weights-only loader (it runs no code); one line if damaged."""
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # a truncated zip, a tampered pickle: torch raises several types
        raise DataError(f"{path} is damaged or not a training state ({type(e).__name__}); start again from the "
                        "checkpoint beside it with --init (without --resume), or from an earlier run") from None


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


def write_model(model, tokenizer, config):
    """The writer of a full checkpoint: config + safetensors (official layout) + tokenizer, into a folder."""
    def write(folder):
        write_safetensors(export_tensors(model), folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        loading.save_tokenizer(tokenizer, folder)
    return write


# ----------------------------------------------------------------------------------------------------
# LoRA (--lora): the base model, its adapters, and what a run writes.
# ----------------------------------------------------------------------------------------------------

def lora_base(name, layout):
    """What identifies --init's base model (loaded, in `layout`): the name given, its folder, layout and
    files' sha256."""
    folder = Path(loading.resolve_model(name)).resolve()
    shown = str(folder) if Path(name).exists() else str(name)      # a folder by its whole path, a Hub name as given
    return {"name": shown, "folder": str(folder), "layout": layout, "sha256": adapters.fingerprint(folder)}


def their_names(base, vision_cfg):
    """our tensor name -> the base layout's name."""
    layout = loading.LAYOUTS[base["layout"]]
    return lambda key: layout.theirs(key, vision_cfg)


def full_parts(model):
    """The parts that learn in full, not through adapters (written beside the adapters)."""
    return [part for part in ("vision_tower", "mm_projector", "llm")
            if any(p.requires_grad for p in getattr(model, part).parameters())
            and not any(isinstance(m, FV.LoRALinear) for m in getattr(model, part).modules())]


def write_lora(model, lora):
    """The writer of a LoRA run: PEFT's adapter files, or (`lora["merge"]`) the merged model in the base's
    layout: every file of the base copied, the tensors of its weight files rewritten under their stored
    names and dtypes, each adapted weight W read from the base's files (not from a bf16 copy) plus
    (alpha / r) B A, and the parts trained in full as they are now."""
    base = lora["base"]
    theirs = their_names(base, model.vision_tower.cfg)

    def write(folder):
        if not lora["merge"]:
            adapters.write_adapter(folder, model, theirs, base["name"], base["sha256"], lora["r"], lora["alpha"],
                                   lora["dropout"], full_parts(model))
            return
        from safetensors import safe_open

        from support.checkpoint import safetensors_files

        source = Path(base["folder"])
        if adapters.fingerprint(source) != base["sha256"]:
            raise DataError(f"the base model {source} changed since this run started (the sha256 of its weights "
                            "differ): restore it to write the merged model (--merge)")
        layers, trained = adapters.lora_layers(model), set(full_parts(model))
        current = model.state_dict()
        ours = {theirs(k.replace(".base_layer.", ".")): k.replace(".base_layer.", ".") for k in current
                if ".lora_" not in k}
        for path in source.iterdir():         # config, tokenizer, index: as they are
            if path.is_file() and path.suffix != ".safetensors" and path.name not in (STATE, "log.jsonl", "loss.png"):
                shutil.copy(path, folder / path.name)
        for path in safetensors_files(source):
            with safe_open(str(path), framework="pt") as f:
                tensors = {name: f.get_tensor(name) for name in f.keys()}
            for name, t in tensors.items():
                key = ours.get(name)
                module = None if key is None else key.rsplit(".", 1)[0]
                if module in layers and key.endswith(".weight"):
                    m = layers[module]
                    delta = m.scaling * (m.lora_B.weight.detach().float() @ m.lora_A.weight.detach().float())
                    tensors[name] = (t.float() + delta).to(t.dtype)
                elif key is not None and key.split(".")[0] in trained:
                    tensors[name] = current[key].detach().to(t.dtype).contiguous()
            write_safetensors(tensors, folder / path.name)
    return write


def save_checkpoint(out, write, state):
    """`write(folder)` (the model's files) + the training state into a temporary folder, then swapped in.
    On any failure the temporary folder is removed and the previous checkpoint stays as it was; a write
    that failed (full disk, quota, file-size limit) becomes one line that says so."""
    out = Path(out)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
        write(tmp)
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


def short_answer(turns):
    """(question, answer) of a conversation's first exchange when the answer is at most 8 words, else
    None: those are scored by exact match (longer answers have many right wordings; later turns would
    need the earlier reference answers in the prompt)."""
    if len(turns[1]["value"].split()) <= 8:
        return turns[0]["value"].replace(FV.IMAGE, "").strip(), turns[1]["value"].strip()
    return None


@torch.no_grad()
def evaluate(core, tokenizer, records, image_size, max_length, batch_size, device, loss):
    """Loss per answer token on held-out records (`loss`: train.py's, in eval mode, no update) and the
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
            total += loss(logits, spread, "token").item()
            tokens += (spread[:, 1:] != -100).sum().item()
        right = asked = 0
        for r in records:
            qa = short_answer(r["conversations"])
            if qa is None or r["image"] is None:
                continue
            chat = Chat(core, tokenizer, load_image(r["folder"] / r["image"]))
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


# ----------------------------------------------------------------------------------------------------
# The run: what train.py's loop stands in.
# ----------------------------------------------------------------------------------------------------

class Run:
    """One training run of train.py: see the module docstring for the order of its calls."""

    def __init__(self, args, world, rank, stages, loss):
        check_arguments(args)
        self.args, self.world, self.rank, self.loss = args, world, rank, loss
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
        self.device = device
        out = self.out = Path(args.out)
        if args.resume and not (out / STATE).is_file():
            raise DataError(f"--resume: {out / STATE} not found; start without --resume")
        if args.fsdp and world < 2:
            raise DataError("--fsdp shards the model across processes: launch with torchrun --nproc_per_node N (N >= 2)")
        if args.fsdp and args.eval_data:
            raise DataError("--eval-data is not supported with --fsdp yet; evaluate the checkpoint afterwards")
        if args.workers:            # the tokenizer's own threads and forked workers do not mix (it would warn)
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        clean_leftovers(out)
        records, self.summary, self.counts = load_datasets(args.data, args.images, args.skip_missing_images)
        self.held_out = (load_datasets(args.eval_data, [args.eval_images or args.images[0]])[0]
                         if args.eval_data else None)
        self.per_step, self.steps_per_epoch, self.total_steps = plan_steps(args, len(records), world)   # before the model loads
        torch.manual_seed(args.seed)

        self.lora = None
        if args.resume:
            state = load_state(out / STATE)
            if state["stage"] != args.stage:
                raise DataError(f"--resume: {out} is a stage {state['stage']} run, not stage {args.stage}")
            lora = state.get("lora")
            if (lora and lora["r"]) != args.lora:
                raise DataError(f"--resume: {out} was trained " + (f"with --lora {lora['r']}; pass it again" if lora
                                else "without --lora; resume it without --lora"))
            if state.get("freeze", []) != args.freeze:
                raise DataError(f"--resume: {out} was trained with --freeze {' '.join(state.get('freeze', [])) or '(none)'}; "
                                "resume it with the same --freeze")
            if lora and args.init and Path(loading.resolve_model(args.init)).resolve() != Path(lora["base"]["folder"]):
                raise DataError(f"--resume: {out}'s adapters belong to {lora['base']['name']}, not to --init "
                                f"{args.init}; leave --init out (or give that base)")
            if lora:
                asked = {"alpha": args.lora_alpha, "dropout": args.lora_dropout, "layers": args.lora_layers.split(","),
                         "merge": args.merge}
                changed = next((k for k in asked if asked[k] != lora[k]), None)
                if changed:
                    raise DataError(f"--resume: {out} was trained with LoRA {changed} {lora[changed]!r}, not "
                                    f"{asked[changed]!r}; resume it with the same --lora options")
                base, self.tokenizer = self.lora_base_again(lora)
                model = self.lora_model(lora, base, state)
            else:
                model, self.tokenizer = model_from_state(state, out)
            self.from_scratch = not state["fused"]
            self.base_config = {} if lora else loading.read_config(out)
            trim_log(out / "log.jsonl", state.get("prior_steps", 0) + state["step"], out)
            self.init_steps = 0
        else:
            if out.exists() and any(out.iterdir()):
                raise DataError(f"{out} exists and is not empty; choose a new --out or pass --resume")
            model, self.tokenizer, self.from_scratch, self.init_steps = initialise(args, records)
            self.base_config = (loading.read_config(loading.resolve_model(args.init))
                                if (args.init and args.init != "scratch" and not args.lora) else {})
            state = None
            if args.lora:
                lora = {"r": args.lora, "alpha": args.lora_alpha, "dropout": args.lora_dropout,
                        "layers": args.lora_layers.split(","), "merge": args.merge, "base": lora_base(args.init, model.layout)}
                model = self.lora_model(lora, model)
        self.state = state
        self.model = self.core = model.to(device)
        bn_train = {"auto": self.from_scratch, "train": True, "eval": False}[args.bn]
        self.bn_train = (bn_train and "vision_tower" in stages[args.stage][0]   # a frozen encoder runs in eval
                         and "vision_tower" not in args.freeze)
        self.dataset = Dataset(records, None, self.tokenizer, model.image_size, args.max_length)
        self.sampler = torch.utils.data.DistributedSampler(self.dataset, num_replicas=world, rank=rank, shuffle=True,
                                                           seed=args.seed, drop_last=True)
        assert len(self.sampler) == len(records) // world            # what plan_steps counted with
        self.image_sizes = parse_sizes(args.image_sizes, model.vision_tower.cfg) if args.image_sizes else (
            state.get("image_sizes") if state is not None and state.get("image_sizes") else [model.image_size])
        self.step, self.prior_steps, self.progress, self.announced, self.saving = 0, 0, None, False, False
        self.truncated = 0
        # records whose image passed the check at the start but failed to decode (--skip-missing-images): a
        # set, since such a record comes round again every epoch
        self.decode_failed = set(state.get("decode_failed", [])) if state is not None else set()
        self.stop_at = min(self.total_steps, args.stop_after) if args.stop_after else self.total_steps
        self.dtype = self.pick_dtype()
        self.autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if self.dtype == torch.bfloat16
                         else contextlib.nullcontext())

    def pick_dtype(self):
        """--dtype: bfloat16 on CUDA; on a CPU for --lora where it has bf16 units (elsewhere bf16 is converted
        to float32 around every product: slower); float32 otherwise."""
        choice = self.args.dtype
        if choice == "auto":
            fast = self.device.type == "cuda" or (self.lora is not None and speedups.bf16_units())
            choice = "bfloat16" if fast else "float32"
        return {"bfloat16": torch.bfloat16, "float32": torch.float32}[choice]

    def lora_base_again(self, lora):
        """--resume: (model, tokenizer) of the base the run started from, whose files must be unchanged."""
        try:
            base, tokenizer, _ = loading.load_model(lora["base"]["folder"], fold_batchnorm=False)
        except CheckpointError as e:
            raise DataError(f"--resume: the base model of {self.out} cannot be loaded ({e})") from None
        if adapters.fingerprint(lora["base"]["folder"]) != lora["base"]["sha256"]:
            raise DataError(f"--resume: the base model {lora['base']['folder']} changed since {self.out} started "
                            "(the sha256 of its weights differ); restore it, or start a new run with --init")
        return base, tokenizer

    def lora_model(self, lora, base, state=None):
        """`base` with LoRA adapters on the layers lora["layers"] names; from a training state, the adapters
        and the parts trained in full as saved."""
        try:
            adapters.add_lora(base, lora["r"], lora["alpha"], lora["dropout"], lora["layers"])
        except adapters.AdapterError as e:
            raise DataError(f"--lora: {e}") from None
        if state is not None:
            trained = state["model"]
            unknown = set(trained) - set(base.state_dict())
            if unknown:
                raise DataError(f"--resume: {self.out}'s training state holds {sorted(unknown)[0]}, which "
                                "the model has no place for: it was written by another version")
            base.load_state_dict(trained, strict=False)
        self.lora = lora
        return base

    def distribute(self, set_trainable):
        """`set_trainable(core, stage, bn_train)` (train.py's: what the stage trains), then activation
        checkpointing and DDP or FSDP as the options ask. Returns the model to call in the loop."""
        args, core = self.args, self.core
        set_trainable(core, args.stage, self.bn_train, args.freeze)
        if self.lora is not None:
            idle = sorted({name.split(".")[0] for name, m in adapters.lora_layers(core).items()
                           if not m.lora_A.weight.requires_grad})
            if idle:
                fix = (f"leave {idle[0]} out of --freeze" if idle[0] in args.freeze
                       else "use --stage 2 (or 0), or other --lora-layers")
                raise DataError(f"--lora-layers put adapters in {idle[0]}, which --stage {args.stage} keeps frozen"
                                f"{' (--freeze)' if idle[0] in args.freeze else ''}; {fix}")
        if self.state is not None and self.lora is not None:
            learning = {n for n, p in core.named_parameters() if p.requires_grad}
            if not learning <= set(self.state["model"]):
                raise DataError(f"--resume: {self.out}'s training state lacks {sorted(learning - set(self.state['model']))[0]}, "
                                "which this run would train; resume it with the options it was started with")
        if not any(p.requires_grad for p in core.parameters()):
            raise DataError(f"--freeze {' '.join(args.freeze)} leaves nothing for --stage {args.stage} to train")
        if self.dtype == torch.bfloat16 and self.lora is not None:   # the frozen base in bf16: half its memory
            # (a full run's checkpoint writes its frozen parts too, so they keep their float32 values there)
            for p in core.parameters():
                if not p.requires_grad:
                    p.data = p.data.to(torch.bfloat16)
            for m in core.modules():            # a frozen BatchNorm's statistics with its weights (one dtype)
                if isinstance(m, torch.nn.BatchNorm2d) and m.weight is not None and not m.weight.requires_grad:
                    m.to(torch.bfloat16)
        self.checkpointed = use_grad_checkpoint(core, self.bn_train) if args.grad_checkpoint else 0
        if self.world > 1 and self.bn_train and self.device.type == "cuda":
            core = self.core = torch.nn.SyncBatchNorm.convert_sync_batchnorm(core)
        self.model = core
        if self.world > 1 and args.fsdp:
            self.model = self.core = shard(core)
        elif self.world > 1:
            # A micro-batch of text-only records leaves the vision tower unused, which DDP must be told.
            self.model = torch.nn.parallel.DistributedDataParallel(
                core, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=self.counts["text-only"] > 0)
        self.params = [p for p in self.core.parameters() if p.requires_grad]
        self.adapter_params = [p for n, p in self.core.named_parameters() if p.requires_grad and ".lora_" in n]
        self.full_params = [p for n, p in self.core.named_parameters() if p.requires_grad and ".lora_" not in n]
        return self.model

    def start(self, optimizer, scheduler):
        """The optimizer and scheduler the checkpoints save; with --resume, their state, the RNG and the step
        from training_state.pt (else the steps the --init run had trained, for the log's global step)."""
        self.optimizer, self.scheduler, state = optimizer, scheduler, self.state
        if state is None:
            self.prior_steps = self.init_steps       # the steps of the run --init continues (0 for a new model)
        else:
            self._restore(state)
        self.image_size = size_at(self.step, self.total_steps, self.image_sizes)   # the first step's

    def _restore(self, state):
        """--resume: the optimizer's moments, the schedule, the RNG and the step from training_state.pt."""
        args, optimizer, scheduler = self.args, self.optimizer, self.scheduler
        if state.get("optimizer_format", "plain") != ("fsdp" if args.fsdp else "plain"):
            raise DataError(f"--resume: {self.out} was trained {'with' if not args.fsdp else 'without'} --fsdp; "
                            "resume it the same way, or start a new run from it with --init")
        if args.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self.core, optimizer, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        self.step, self.prior_steps = state["step"], state.get("prior_steps", 0)

    def steps(self):
        """Each optimizer step's micro-batches, on the device, until the run's last step (or --stop-after).
        A DataLoader's workers decode them ahead of the loop."""
        args, out = self.args, self.out
        plan = {"grad_accum": args.grad_accum, "batch_size": args.batch_size, "per_step": self.per_step,
                "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
                "image_sizes": self.image_sizes}
        pad_id = self.tokenizer.token_id("<|endoftext|>") or 0
        loader = torch.utils.data.DataLoader(
            StepBatches(self.dataset, self.sampler, plan, self.step, self.stop_at, pad_id, args.skip_missing_images),
            batch_size=None, num_workers=args.workers, pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if args.workers else None,
            generator=torch.Generator().manual_seed(args.seed))   # its seed draw leaves torch's RNG (dropout) alone
        batches_ahead = iter(loader)
        while self.step < self.stop_at:
            self.t_data = time.perf_counter()
            micro = [next(batches_ahead) for _ in range(args.grad_accum)]
            failed = next((m["error"] for m in micro if "error" in m), None)
            if failed:                  # an image that passed the check at the start but will not decode
                if self.step > 0:
                    self.checkpoint()
                raise DataError(f"{failed}; fix the image or pass --skip-missing-images, then rerun"
                                + (f" with --resume (step {self.step} is saved in {out})" if self.step > 0 else ""))
            self.decode_failed.update(i for m in micro for i in m["skipped"])
            self.truncated += sum(m["truncated"] for m in micro)
            self.image_size = micro[0]["image_size"]
            batches = [tuple(None if t is None else t.to(self.device, non_blocking=True) for t in m["batch"])
                       for m in micro]
            if not self.announced:
                self.announce()
                self.announced = True
            self.t_compute = time.perf_counter()
            yield batches

    def check_finite(self, loss, grad_norm):
        """Nothing to learn from a non-finite loss or gradient: stop, keeping what was good."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            out = self.out
            kept = (f"the last checkpoint in {out} is from before it" if (out / STATE).is_file()
                    else "no checkpoint was written")
            raise TrainingError(f"the loss or the gradient norm became non-finite at step {self.step + 1} (lr "
                                f"{self.scheduler.get_last_lr()[0]:g}); {kept}; lower --lr"
                                + (" or --lora-lr" if self.lora else ""))

    def step_done(self, loss, lr, grad_norm):
        """After the optimizer's step: count it, log it, show it; evaluate and save when due."""
        args = self.args
        self.step += 1
        step = self.step
        compute_s = time.perf_counter() - self.t_compute
        rate = self.per_step * self.world / (time.perf_counter() - self.t_data)     # data time included
        if self.rank == 0:
            self.append_log({"stage": args.stage, "step": step, "global_step": self.prior_steps + step,
                             "epoch": (step - 1) // self.steps_per_epoch, "loss": loss, "lr": lr,
                             "grad_norm": grad_norm, "samples_per_s": rate, "data_s": self.t_compute - self.t_data,
                             "compute_s": compute_s, "image_size": self.image_size, **gpu_memory(self.device)})
            if self.progress is not None:
                self.progress.update(1)
                self.progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{rate:.1f}")
        if self.held_out and args.eval_every and step % args.eval_every == 0 and step < self.total_steps:
            self.held_out_eval()
        if args.save_every and step % args.save_every == 0 and step < self.stop_at:
            self.checkpoint()

    def announce(self):
        """Once the first batch has loaded (bad data fails before anything is printed or written)."""
        if self.rank != 0:
            return
        args, out, core = self.args, self.out, self.core
        out.mkdir(parents=True, exist_ok=True)
        previous_log = Path(args.init or "") / "log.jsonl"
        if self.state is None and args.init not in (None, "scratch") and previous_log.is_file() and not self.lora:
            try:                                           # one log (and loss curve) across the stages
                shutil.copy(previous_log, out / "log.jsonl")
            except OSError as e:
                raise (write_failure(e, f"copying {previous_log}", out) or e) from None
        trainable = sum(p.numel() for p in self.params)
        print(self.summary, file=sys.stderr)
        n = torch.get_num_threads()      # shown when chosen: --threads (else torch's default, machine-dependent)
        threads = f" ({n} thread{'s' if n > 1 else ''})" if args.threads and self.device.type == "cpu" else ""
        lr = " and ".join(f"{g['initial_lr']:g}" for g in self.optimizer.param_groups)
        lora = self.lora
        lora = (f", LoRA r {lora['r']} alpha {lora['alpha']:g} on {len(adapters.lora_layers(core))} layers "
                f"({sum(p.numel() for p in self.adapter_params):,} adapter parameters)" if lora else "")
        print(f"stage {args.stage}: training {trainable:,} of {sum(p.numel() for p in core.parameters()):,} "
              f"parameters{lora}, {self.total_steps} steps of {self.per_step * self.world} samples, lr {lr}, "
              + ("bfloat16 (frozen weights stored in bf16, products under autocast), "
                 if self.dtype == torch.bfloat16 else "") +
              f"{self.world} process(es) on {self.device.type}{threads}, encoder in "
              f"{'training' if self.from_scratch else 'fused'} form, BatchNorm {'train' if self.bn_train else 'eval'}"
              + (f", activation checkpointing in {self.checkpointed} blocks" if self.checkpointed else ""),
              file=sys.stderr)
        if not args.no_progress:
            from tqdm import tqdm
            self.progress = tqdm(total=self.total_steps, initial=self.step, desc=f"stage {args.stage}",
                                 dynamic_ncols=True)

    def make_state(self, model_state=None, optimizer_state=None):
        core = self.core
        if self.lora is not None:     # what learns; the frozen base is the files named in "lora"
            model_state = {n: p.detach().clone() for n, p in core.named_parameters() if p.requires_grad}
            for part in full_parts(core):       # and their buffers (BatchNorm statistics that --bn train updates)
                model_state.update({f"{part}.{n}": b.detach().clone() for n, b in getattr(core, part).named_buffers()})
        return {"model": model_state or core.state_dict(), "lora": self.lora,
                "optimizer": optimizer_state or self.optimizer.state_dict(),
                "optimizer_format": "fsdp" if self.args.fsdp else "plain", "scheduler": self.scheduler.state_dict(),
                "rng": torch.get_rng_state(), "step": self.step, "prior_steps": self.prior_steps,
                "stage": self.args.stage, "freeze": self.args.freeze,
                "fused": not self.from_scratch,   # training form from scratch, official (fused) form otherwise
                "vision_cfg": asdict(core.vision_tower.cfg), "llm_cfg": asdict(core.llm.cfg), "seed": self.args.seed,
                "image_sizes": self.image_sizes, "decode_failed": sorted(self.decode_failed)}

    def append_log(self, row):
        """One row of log.jsonl (reopened each time: a checkpoint swaps the folder); a failed write is one line."""
        try:
            with open(self.out / "log.jsonl", "a") as log:
                log.write(json.dumps(row) + "\n")
        except OSError as e:
            raise (write_failure(e, f"writing {self.out / 'log.jsonl'}", self.out) or e) from None

    def held_out_eval(self):
        """Held-out loss and exact match, logged beside the training loss (rank 0; the others wait)."""
        if self.rank == 0:
            args, core = self.args, self.core
            core.vision_tower.cfg = replace(core.vision_tower.cfg, image_size=self.image_size)
            with self.autocast:
                loss, exact, asked = evaluate(core, self.tokenizer, self.held_out, self.image_size, args.max_length,
                                              args.batch_size, self.device, self.loss)
            self.append_log({"stage": args.stage, "step": self.step, "global_step": self.prior_steps + self.step,
                             "eval_loss": loss, "eval_exact": exact, "eval_asked": asked})
            shown = "" if exact is None else f", exact match {exact:.1%} of {asked} short answers"
            (self.progress.write if self.progress is not None else lambda m: print(m, file=sys.stderr))(
                f"step {self.step}: held-out loss {loss:.4f}{shown}")
        if self.world > 1:
            dist.barrier()

    def checkpoint(self):
        """The model in the official layout and the training state, swapped into --out whole."""
        self.saving = True
        try:
            self._checkpoint()
        finally:
            self.saving = False

    def _checkpoint(self):
        args, out, core = self.args, self.out, self.core
        # the size trained at last is the checkpoint's size (its config's `mobileclip_l_<size>`)
        core.vision_tower.cfg = replace(core.vision_tower.cfg, image_size=self.image_size)
        if args.fsdp:   # gather the shards; rank 0 writes them from a plain model, as without FSDP
            model_state, optimizer_state = full_state(core, self.optimizer)
        if self.rank == 0:
            if args.fsdp:
                with torch.device("meta"):
                    plain = FV.FastVLM(core.vision_tower.cfg, core.llm.cfg, fused=not self.from_scratch)
                plain = loading.allocate(plain)
                plain.load_state_dict(model_state)
                save_checkpoint(out, write_model(plain, self.tokenizer, config_dict(plain, self.base_config)),
                                self.make_state(model_state, optimizer_state))
            elif self.lora:
                save_checkpoint(out, write_lora(core, self.lora), self.make_state())
            else:
                save_checkpoint(out, write_model(core, self.tokenizer, config_dict(core, self.base_config)),
                                self.make_state())
            if (out / "log.jsonl").is_file():
                try:
                    plot_losses(out / "log.jsonl", out / "loss.png")
                except OSError as e:        # the plot is a convenience; the checkpoint beside it is complete
                    (out / "loss.png").unlink(missing_ok=True)
                    print(f"note: {out / 'loss.png'} not written ({os.strerror(e.errno) if e.errno else e})",
                          file=sys.stderr)
        if self.world > 1:
            dist.barrier()

    @contextlib.contextmanager
    def guard(self):
        """Around the loop: Ctrl-C saves what the finished steps learnt (resumable) and says where; a new
        run that fails before its first checkpoint (bad data mid-run, a NaN, a full disk at the final
        save, Ctrl-C) leaves --out as it found it: absent, or empty. A log.jsonl alone would block both a
        rerun (the folder is not empty) and --resume (there is no state)."""
        out, existed = self.out, self.out.exists()
        try:
            try:
                yield
            except KeyboardInterrupt:
                if self.saving and self.rank == 0:      # the cut save left the previous checkpoint whole
                    print(f"interrupted while saving: {out} holds the last complete checkpoint; continue with "
                          "--resume", file=sys.stderr)
                elif self.step > 0:
                    self.checkpoint()
                    if self.rank == 0:
                        print(f"interrupted: step {self.step} is saved in {out}; continue with --resume",
                              file=sys.stderr)
                elif self.rank == 0:
                    print("interrupted before the first step; nothing was written", file=sys.stderr)
                raise
        except BaseException:
            if self.progress is not None:           # closed now, not whenever it is collected (the bar would be
                self.progress.close()               # drawn again in the middle of whatever runs then)
            if self.state is None and self.rank == 0 and not (out / STATE).is_file():
                shutil.rmtree(out, ignore_errors=True)
                if existed:
                    out.mkdir()
            raise

    def finish(self):
        """The last evaluation and checkpoint."""
        if self.progress is not None:
            self.progress.close()
        if self.held_out and self.step == self.total_steps:
            self.held_out_eval()
        self.checkpoint()

    def report(self):
        """What was truncated or left out, said once, and where the model is."""
        args, counts = self.args, self.counts
        if self.world > 1 and args.skip_missing_images:       # each process met its own share of the records
            shares = [None] * self.world
            dist.all_gather_object(shares, sorted(self.decode_failed))
            self.decode_failed.update(i for share in shares for i in share)
        if self.rank == 0:
            if self.truncated:
                print(f"note: {self.truncated} samples were longer than --max-length {args.max_length} "
                      "and were truncated", file=sys.stderr)
            left_out = counts["images skipped"] + len(self.decode_failed)
            if left_out:   # the records, each once: the start's "images skipped" plus those that failed later
                why = ([f"{counts['images skipped']} skipped at the start (image missing or unreadable)"]
                       if counts["images skipped"] else [])
                why += ([f"{len(self.decode_failed)} whose image failed to decode during training"]
                        if self.decode_failed else [])
                print(f"note: {left_out} records were left out: {' and '.join(why)}", file=sys.stderr)
            print(f"wrote {self.out} (step {self.step} of {self.total_steps})", file=sys.stderr)


def main(train, argv, parser):
    """train.py's main: `train(args, world, rank)` with the processes torchrun started; a refusal is one
    line on stderr and exit status 2, Ctrl-C 130."""
    args = parser.parse_args(argv)
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    try:
        return train(args, world, rank)
    except (DataError, CheckpointError, InputError, TrainingError) as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
