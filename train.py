"""Train FastVLM with the paper's recipe (Sec. 4.1, following LLaVA-1.5), on one CPU or many GPUs.

    --stage 1    projector only (vision encoder and LLM frozen), lr 1e-3: align image tokens to the LLM
    --stage 1.5  vision encoder + projector (LLM frozen), lr 2e-5: adapt the encoder (higher resolution)
    --stage 2    everything, lr 2e-5: visual instruction tuning
    --stage 0    everything, lr 1e-3: not in the paper. FastVLM inherits a pretrained encoder (MobileCLIP)
                 and LLM (Qwen2); a model built from scratch must first learn to see and to write, which
                 this stage does on captions before the paper's stages run (the tiny model's recipe).
AdamW, cosine decay after 3 % linear warm-up, gradient accumulation, gradient clipping, bf16 autocast on
CUDA and fp32 on CPU (--dtype); every default can be overridden on the command line.

LoRA (--lora R, fastvlm.LoRALinear), LLaVA-1.5's recipe for fine-tuning on a small budget (scripts/v1_5/
finetune_lora.sh: r 128, alpha 256, dropout 0.05, lr 2e-4 for the adapters and 2e-5 for the projector): the
decoder's attention and MLP projections are frozen and learn through low-rank adapters at --lora-lr; the
stage's other parts learn in full at the stage's lr; the rest stays frozen. With --stage 2 and --freeze
vision_tower that is LLaVA-1.5's recipe exactly (FastVLM's stage 2 also trains the encoder). The run writes
the adapters alone (PEFT's files, `infer.py --model BASE --adapter RUN`), or with --merge the merged model.
--dtype bfloat16 computes under bf16 autocast and, with --lora, keeps the frozen base in bf16 (half its
memory); what learns, and AdamW's moments, stay fp32.

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
  * Checkpoints are always written fused, in the official layout (what infer.py reads); training_state.pt
    beside them keeps the training-form weights, the optimizer, scheduler, step, RNG and data position,
    so that --resume (and a later stage's --init) continue exactly (support/training.py).

Distributed: launched by torchrun, each process takes its share of every global batch through a
distributed sampler and DDP averages the gradients (nccl on GPUs, gloo on CPU); without torchrun it is
one process. The global batch is batch-size x processes x grad-accum.

    torchrun --nproc_per_node 8 train.py --stage 2 --init llava-fastvithd_0.5b_stage2 ...
"""

import math
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

import fastvlm as FV
from support import training
from support.options import train_parser

STAGES = {  # which parts learn, and the peak learning rate (Sec. 4.1; LLaVA-1.5's scripts/v1_5/pretrain.sh
            # trains the projector alone at 1e-3, scripts/v1_5/finetune.sh the model at 2e-5)
    "0": (("vision_tower", "mm_projector", "llm"), 1e-3),   # from scratch only: see the docstring
    "1": (("mm_projector",), 1e-3),
    "1.5": (("vision_tower", "mm_projector"), 2e-5),
    "2": (("vision_tower", "mm_projector", "llm"), 2e-5),
}


def set_trainable(model, stage, bn_train, freeze=()):
    """The stage's parts learn (and run in train mode) unless `freeze` names them; the others are frozen
    (and run in eval mode). A part that holds LoRA adapters learns through them alone: its own weights
    stay as they are. `bn_train`: whether the encoder's BatchNorms learn batch statistics (from scratch)."""
    parts, _ = STAGES[stage]
    for name in ("vision_tower", "mm_projector", "llm"):
        module = getattr(model, name)
        learn = name in parts and name not in freeze
        lora = [m for m in module.modules() if isinstance(m, FV.LoRALinear)]
        module.requires_grad_(learn and not lora)
        for m in lora:                              # only A and B: W x + (alpha / r) B A x
            m.lora_A.requires_grad_(learn)
            m.lora_B.requires_grad_(learn)
        module.train(learn)
    if not bn_train:   # BatchNorm on running statistics (see the module docstring)
        for m in model.vision_tower.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eval()


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


# ----------------------------------------------------------------------------------------------------
# The loss: next-token cross-entropy on the answers' tokens only.
# ----------------------------------------------------------------------------------------------------

def answer_loss(logits, labels, average):
    """The summed loss of a batch: logits (B, T, vocab) predict the labels (B, T) one position later
    (position t predicts token t + 1); -100 labels (prompt, image tokens, padding) add nothing. "token"
    sums every answer token's cross-entropy; "sample" sums each sample's mean over its answer tokens.
    The caller divides by the step's count of tokens or samples. bf16 logits (autocast) are upcast to
    float32 first; float64 stays (exact comparisons in the tests)."""
    logits = logits if logits.dtype == torch.float64 else logits.float()
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                         ignore_index=-100, reduction="none").view(labels.shape[0], -1)     # (B, T - 1)
    if average == "token":
        return ce.sum()
    n = (labels[:, 1:] != -100).sum(1)
    return (ce.sum(1) / n.clamp(min=1)).sum()


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
        with training.gradient_sync(model, world > 1 and not sync):   # DDP/FSDP reduce once, at the last
            logits, spread = model(pixels, ids, labels)    # labels spread over the image's tokens (-100)
            loss_sum = answer_loss(logits, spread, average)
            (loss_sum * world / total).backward()
        loss_value += loss_sum.item()
    reported = torch.tensor(loss_value, dtype=torch.float64)
    if world > 1:
        dist.all_reduce(reported)
    return (reported / total).item()


# ----------------------------------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------------------------------

@torch.enable_grad()            # whatever the caller's grad mode (a notebook or a test may have turned it off)
def train(args, world=1, rank=0):
    # The device, the processes, the data and the model (new, --init or --resume): support/training.py.
    run = training.Run(args, world, rank, STAGES, answer_loss)
    model = run.distribute(set_trainable)           # the stage's parts learn; DDP or FSDP across processes
    lr = args.lr if args.lr is not None else STAGES[args.stage][1]
    groups = [{"params": run.full_params, "lr": lr}, {"params": run.adapter_params, "lr": args.lora_lr}]  # LoRA: 2e-4
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.999),
                                  weight_decay=args.weight_decay)
    warmup = max(1, round(args.warmup * run.total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_with_warmup(s, run.total_steps, warmup))
    run.start(optimizer, scheduler)                 # with --resume: optimizer, schedule, RNG, step as they were

    with run.guard():                               # Ctrl-C saves; a failed new run leaves --out as it was
        for batches in run.steps():                 # one optimizer step: grad-accum micro-batches
            with run.autocast:                      # --dtype: bf16 autocast, or none
                loss = step_loss(model, batches, args.loss_average, world)
            grad_norm = torch.nn.utils.clip_grad_norm_(run.params, args.clip)
            grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()  # FSDP: a DTensor
            run.check_finite(loss, grad_norm)       # nothing to learn from a NaN: stop, keep what was good
            lr_used = scheduler.get_last_lr()[0]    # this step's, logged beside its loss
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            run.step_done(loss, lr_used, grad_norm)   # log, progress, evaluation and saves when due
        run.finish()                                # the last evaluation and the checkpoint
    run.report()
    return 0


def build_parser():
    return train_parser(__doc__, STAGES)


def main(argv=None):
    return training.main(train, argv, build_parser())


if __name__ == "__main__":
    sys.exit(main())
