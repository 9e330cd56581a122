"""How far bfloat16 and int8 weights move FastVLM's answers from float32's, over many prompts.

    python tools/fidelity.py                                  # the embedded tiny model, 50 shapes questions
    python tools/fidelity.py --model checkpoints/FastVLM-0.5B --prompts 100
    python tools/fidelity.py --synthetic                      # random weights at FastVLM-0.5B's shapes

Each prompt is an image and a question (tools/shapes_data.py draws them: coloured shapes and the
questions the tiny model was trained on). Every variant answers every prompt, and is compared with
float32 on the same prompt:

    first token    the share of prompts whose first greedy token equals float32's
    top-5 overlap  of the first token's five most likely ids, the share also in float32's five (mean)
    max |dlogit|   the largest difference of a first-token logit from float32's, over all prompts,
                   relative to the spread (standard deviation) of float32's logits on that prompt
    greedy equal   of float32's greedy tokens (up to --new-tokens, its stop counted as one), the share
                   that the variant reproduces before its first different token (mean over prompts)

Random weights (--synthetic) lack the large outlier channels that trained weights have, which are
what makes int8 rounding hard: their figures say the code is right, not how a release behaves. The
released weights, where you have them, tell that (--model). Results: docs/performance.md.
"""

import argparse
import random
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]                # the model files, when run as a script

import fastvlm as FV  # noqa: E402
from support import loading  # noqa: E402
from support.chat import Chat  # noqa: E402

# name -> load_model's dtype and quantize
VARIANTS = {"float32": (torch.float32, None), "bfloat16": (torch.bfloat16, None),
            "int8 (bfloat16)": (torch.bfloat16, "int8"), "int8 (float32)": (torch.float32, "int8")}
MAX_PROMPTS = 2000                                            # a bound on the run (each prompt: seconds at 0.5B)


def prompts(n, seed=0):
    """n (image, question) pairs: a scene of coloured shapes and one of its questions, every type in turn."""
    from shapes_data import QUESTION_TYPES, draw_scene, questions, random_scene

    rng = random.Random(seed)
    out = []
    for i in range(n):
        objects = random_scene(rng)
        qa = questions(objects, rng)
        wanted = [q for t, q, _ in qa if t == QUESTION_TYPES[i % len(QUESTION_TYPES)]]
        out.append((draw_scene(objects, rng), rng.choice(wanted or [q for _, q, _ in qa])))
    return out


@torch.no_grad()
def answer(model, tokenizer, image, question, new_tokens):
    """(the first token's logits as float32 (vocab,), the greedy answer's token ids)."""
    chat = Chat(model, tokenizer, image)
    embeds = model.embed(FV.turn_ids(tokenizer, question, first=True), chat.encode_image())   # kept for ask()
    model.llm.setup_cache(embeds.shape[1] + 1)
    logits = model.llm(embeds=embeds, start=0, last_only=True)[0, -1, :chat.vocab_limit].float()
    tokens = []
    chat.ask(question, max_new_tokens=new_tokens, on_token=tokens.append)
    return logits, tokens


STOPPED = -1        # stands for the stop token of an answer that ended before the token limit


def compare(reference, other, limit, k=5):
    """The four figures of one prompt: other's (logits, tokens) against the reference's. An answer that
    stopped before `limit` tokens ends with STOPPED, so that stopping where the other goes on (or the
    reverse) is a difference too."""
    (ref_logits, ref_tokens), (logits, tokens) = reference, other
    ref_tokens = ref_tokens + [STOPPED] * (len(ref_tokens) < limit)
    tokens = tokens + [STOPPED] * (len(tokens) < limit)
    top_ref, top = set(ref_logits.topk(k).indices.tolist()), set(logits.topk(k).indices.tolist())
    same = 0
    while same < min(len(ref_tokens), len(tokens)) and ref_tokens[same] == tokens[same]:
        same += 1
    return {"first": float(ref_logits.argmax() == logits.argmax()), "top5": len(top_ref & top) / k,
            "dlogit": float((ref_logits - logits).abs().max() / ref_logits.std()),
            "greedy": same / max(len(ref_tokens), 1)}


def fidelity(folder, n_prompts=50, new_tokens=16, variants=("bfloat16", "int8 (bfloat16)", "int8 (float32)"),
             seed=0, progress=True):
    """{variant: {figure: value}} against float32 over n_prompts prompts; max over prompts for dlogit,
    the mean for the others. Also returns float32's own logit spread (mean std), for scale."""
    from tqdm import tqdm

    items = prompts(n_prompts, seed)
    results = {}
    for name in ("float32", *variants):
        dtype, quantize = VARIANTS[name]
        model, tokenizer, _ = loading.load_model(folder, dtype=dtype, quantize=quantize)
        results[name] = [answer(model, tokenizer, image, q, new_tokens)
                         for image, q in tqdm(items, desc=name, leave=False, disable=not progress)]
        del model
    table = {}
    for name in variants:
        rows = [compare(r, o, new_tokens) for r, o in zip(results["float32"], results[name])]
        table[name] = {key: (max if key == "dlogit" else mean)([row[key] for row in rows]) for key in rows[0]}
    spread = mean([float(r[0].std()) for r in results["float32"]])
    return table, spread


def mean(values):
    return sum(values) / len(values)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "models" / "fastvlm-tiny"),
                   help="a model folder or Hub name (default: the embedded tiny model)")
    p.add_argument("--synthetic", action="store_true",
                   help="random weights at FastVLM-0.5B's shapes instead of --model (2.5 GB written to a temporary folder)")
    p.add_argument("--prompts", type=int, default=50, help=f"images and questions, 1 to {MAX_PROMPTS} (default: %(default)s)")
    p.add_argument("--new-tokens", type=int, default=16, help="greedy tokens compared, 1 to 256 (default: %(default)s)")
    args = p.parse_args(argv)
    if not 1 <= args.prompts <= MAX_PROMPTS or not 1 <= args.new_tokens <= 256:
        p.error(f"--prompts must be 1 to {MAX_PROMPTS} and --new-tokens 1 to 256")
    torch.set_grad_enabled(False)
    folder = args.model
    if args.synthetic:
        from synthetic import LLM_0_5B, write_fastvlm_checkpoint

        folder = write_fastvlm_checkpoint(Path(tempfile.mkdtemp()) / "fastvlm-0.5b-random", LLM_0_5B,
                                          dtype=torch.float32)
    table, spread = fidelity(folder, args.prompts, args.new_tokens)
    print(f"{'FastVLM-0.5B shapes, random weights' if args.synthetic else args.model}: {args.prompts} prompts, "
          f"{args.new_tokens} greedy tokens, against float32 (logit spread {spread:.3g}); torch {torch.__version__}")
    print("| variant | first token equal | top-5 overlap | max abs logit difference / spread | greedy tokens equal |")
    print("|---|---|---|---|---|")
    for name, row in table.items():
        print(f"| {name} | {row['first']:.0%} | {row['top5']:.0%} | {row['dlogit']:.3f} | {row['greedy']:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
