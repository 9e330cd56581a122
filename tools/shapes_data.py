"""Synthetic visual question answering: coloured shapes drawn with PIL, in LLaVA's conversation format.

The tiny FastVLM (train.py) learns from this on a CPU, and its accuracy on fresh samples proves the
pipeline works end to end. Each image holds one to three shapes; each record is a multi-turn
conversation about it. Answers need the image: the colour of a named shape, the shape of a named
colour (binding colour to object), the count, whether a combination is present, and a description
(the miniature of the paper's alignment data). A *blind* baseline (the same questions about a blank
image) shows how far the question alone gets: near chance.

    python tools/shapes_data.py generate --out data/shapes --train 20000 --heldout 500 --seed 0
    python tools/shapes_data.py evaluate --model models/fastvlm-tiny --samples 500 --seed 1234
"""

import argparse
import json
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))    # the model files, when run as a script

COLORS = {"red": (220, 40, 40), "green": (30, 160, 60), "blue": (40, 80, 225), "yellow": (235, 200, 30)}
SHAPES = ("circle", "square", "triangle")
SIDE = 256
BACKGROUND = (236, 236, 236)
QUESTION_TYPES = ("color", "shape", "count", "exists", "describe")
# A question type the embedded tiny model never saw, kept out of its data: the LoRA recipe
# (tools/lora_recipe.sh) teaches it. Three answers, one per shape, so chance is one in three.
CORNERS = {"circle": "0", "triangle": "3", "square": "4"}
NEW_TYPES = ("corners",)


def draw_scene(objects, rng):
    """objects: [(color, shape)] -> RGB image, each shape in its own cell of a 2x2 layout, left to right
    in reading order of the cells chosen."""
    img = Image.new("RGB", (SIDE, SIDE), BACKGROUND)
    draw = ImageDraw.Draw(img)
    cells = sorted(rng.sample(range(4), len(objects)), key=lambda c: (c % 2, c // 2))   # left column first
    half = SIDE // 2
    for (color, shape), cell in zip(objects, cells):
        size = rng.randint(52, 96)
        x0 = (cell % 2) * half + rng.randint(8, half - size - 8)
        y0 = (cell // 2) * half + rng.randint(8, half - size - 8)
        box = (x0, y0, x0 + size, y0 + size)
        fill = COLORS[color]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(x0 + size / 2, y0), (x0 + size, y0 + size), (x0, y0 + size)], fill=fill)
    return img


def describe(objects):
    words = [f"a {c} {s}" for c, s in objects]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def questions(objects, rng):
    """Every (type, question, answer) that has one right answer for this scene."""
    out = [("describe", "Describe the image.", describe(objects)),
           ("count", "How many shapes are there?", str(len(objects)))]
    shapes = [s for _, s in objects]
    colors = [c for c, _ in objects]
    for color, shape in objects:
        if shapes.count(shape) == 1:
            out.append(("color", f"What color is the {shape}?", color))
        if colors.count(color) == 1:
            out.append(("shape", f"What shape is the {color} object?", shape))
            out.append(("corners", f"How many corners does the {color} object have?", CORNERS[shape]))
    present = rng.random() < 0.5
    if present:
        color, shape = rng.choice(objects)
    else:
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in objects]
        color, shape = rng.choice(absent)
    out.append(("exists", f"Is there a {color} {shape}?", "yes" if present else "no"))
    return out


def random_scene(rng, max_objects=3):
    n = rng.randint(1, max_objects)
    combos = [(c, s) for c in COLORS for s in SHAPES]
    return rng.sample(combos, n)


def sample(rng, turns=3, max_objects=3, types=QUESTION_TYPES):
    """One scene and a conversation of up to `turns` questions about it (types drawn at random); a scene
    with no question of `types` is drawn again."""
    by_type = {}
    while not by_type:
        objects = random_scene(rng, max_objects)
        qa = questions(objects, rng)
        for t, q, a in qa:
            if t in types:
                by_type.setdefault(t, []).append((t, q, a))
    kinds = rng.sample(sorted(by_type), min(turns, len(by_type)))
    return objects, [rng.choice(by_type[k]) for k in kinds]


def to_record(sample_id, image_name, qa):
    conversations = []
    for i, (_, q, a) in enumerate(qa):
        conversations.append({"from": "human", "value": ("<image>\n" if i == 0 else "") + q})
        conversations.append({"from": "gpt", "value": a})
    return {"id": sample_id, "image": image_name, "conversations": conversations,
            "types": [t for t, _, _ in qa]}


def generate(out, n_train, n_heldout, seed, turns=3, max_objects=3, types=QUESTION_TYPES):
    """Write images/ and train.json / heldout.json (LLaVA format) under `out`."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for split, n in (("train", n_train), ("heldout", n_heldout)):
        records = []
        for i in range(n):
            objects, qa = sample(rng, turns, max_objects, types)
            name = f"{split}_{i:06d}.png"
            draw_scene(objects, rng).save(out / "images" / name)
            records.append(to_record(f"{split}-{i}", name, qa))
        tmp = out / f".{split}.json.tmp"
        tmp.write_text(json.dumps(records))
        tmp.replace(out / f"{split}.json")
    return out


def evaluate(model, tokenizer, samples=500, seed=1234, blind=False, progress=True, types=QUESTION_TYPES):
    """Exact-match accuracy per question type on fresh single-question samples of `types`; blind = blank
    image. A scene with no question of those types is drawn again."""
    from support.chat import Chat

    rng = random.Random(seed)
    blank = Image.new("RGB", (SIDE, SIDE), BACKGROUND)
    right, total = {}, {}
    items = []
    while len(items) < samples:                  # the same items with and without `blind`
        objects = random_scene(rng)
        qa = questions(objects, rng)
        kinds = sorted({t for t, _, _ in qa if t in types})
        if not kinds:
            continue
        kind = rng.choice(kinds)
        t, q, a = rng.choice([x for x in qa if x[0] == kind])
        items.append((draw_scene(objects, rng), t, q, a))
    if progress:
        from tqdm import tqdm
        items = tqdm(items, desc="blind" if blind else "evaluate", leave=False, mininterval=2)
    for image, t, q, a in items:
        image = blank if blind else image
        got = Chat(model, tokenizer, image).ask(q, max_new_tokens=24)
        total[t] = total.get(t, 0) + 1
        right[t] = right.get(t, 0) + (got.strip().lower() == a)
    per_type = {t: right[t] / total[t] for t in sorted(total)}
    overall = sum(right.values()) / sum(total.values())
    return overall, per_type, total


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="write a LLaVA-format data set")
    g.add_argument("--out", default="data/shapes")
    g.add_argument("--train", type=int, default=20000)
    g.add_argument("--heldout", type=int, default=500)
    g.add_argument("--turns", type=int, default=3, help="questions per conversation")
    g.add_argument("--max-objects", type=int, default=3, choices=[1, 2, 3])
    g.add_argument("--types", default=",".join(QUESTION_TYPES), help="question types to ask, comma separated, of "
                   f"{','.join(QUESTION_TYPES + NEW_TYPES)} (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0)
    e = sub.add_parser("evaluate", help="accuracy of a model on fresh samples, with the blind baseline")
    e.add_argument("--model", default="models/fastvlm-tiny")
    e.add_argument("--samples", type=int, default=500)
    e.add_argument("--seed", type=int, default=1234)
    e.add_argument("--adapter", default=None, help="a LoRA adapter folder for --model (default: none)")
    e.add_argument("--types", default=",".join(QUESTION_TYPES), help="question types to ask, comma separated "
                   "(default: %(default)s)")
    e.add_argument("--json", default=None, help="also write the accuracies to this JSON file (default: none)")
    args = p.parse_args(argv)
    types = tuple(t for t in args.types.split(",") if t)
    if not types or set(types) - set(QUESTION_TYPES + NEW_TYPES):
        print(f"error: --types must be a comma-separated subset of {','.join(QUESTION_TYPES + NEW_TYPES)}",
              file=sys.stderr)
        return 2
    if args.cmd == "generate":
        out = generate(args.out, args.train, args.heldout, args.seed, args.turns, args.max_objects, types)
        print(f"wrote {args.train} train and {args.heldout} held-out conversations under {out}")
        return 0
    import torch

    from support.checkpoint import CheckpointError
    from support.loading import load_model

    torch.set_grad_enabled(False)
    try:
        model, tokenizer, _ = load_model(args.model, adapter=args.adapter)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    seen, per_seen, counts = evaluate(model, tokenizer, args.samples, args.seed, types=types)
    blind, per_blind, _ = evaluate(model, tokenizer, args.samples, args.seed, blind=True, types=types)
    if args.json:
        Path(args.json).write_text(json.dumps({"accuracy": seen, "per_type": per_seen, "blind": blind,
                                               "blind_per_type": per_blind, "samples": counts}, indent=2))
    print("| question type | samples | accuracy | blind (blank image) |\n|---|---|---|---|")
    for t in per_seen:
        print(f"| {t} | {counts[t]} | {per_seen[t]:.1%} | {per_blind[t]:.1%} |")
    print(f"| **overall** | {sum(counts.values())} | **{seen:.1%}** | {blind:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
