"""Ask FastVLM about an image, or many questions about many images.

    python infer.py photo.jpg "What does the sign say?"                 # the embedded tiny model
    python infer.py photo.jpg "What does the sign say?" --model apple/FastVLM-0.5B
    python infer.py photo.jpg --model checkpoints/FastVLM-0.5B          # interactive chat about the image
    python infer.py --batch questions.jsonl --out answers.jsonl --model ...
    python infer.py photo.jpg "What does the sign say?" --model BASE --adapter runs/my-lora   # LoRA (train.py --lora)

`--model` takes a folder (Apple's LLaVA layout, transformers' fast_vlm layout, or train.py's output) or
a Hugging Face repo id, found in the local Hugging Face cache (or downloaded when huggingface_hub is
installed). Greedy decoding by default (deterministic); the answer streams to stdout as it is
generated (`--json` prints one JSON object instead). `--timing` prints the time to first token split
into its parts, then decode speed and peak memory.

One question travels: the image file is read (support/chat.py's load_image), the model is loaded
(support/loading.py), and a Chat asks it: preprocess -> FastViTHD -> projector -> the prompt with the
image's tokens spliced in -> prefill -> decode, token by token to stdout. A chat keeps the KV cache
between questions, so a follow-up prefills only its own tokens.
"""

import json
import sys

from support import batch
from support.options import UsageError, check_options, infer_parser, load


def single(args):
    """One question, or an interactive chat, about one image."""
    from fastvlm import SYSTEM_PROMPT
    from support import speedups
    from support.chat import Chat, InputError, Streamer, load_image, print_timing

    image = load_image(args.image)                           # fail fast, before loading a model
    model, tokenizer, config, device = load(args)
    chat = Chat(model, tokenizer, image, config, system=SYSTEM_PROMPT if args.system is None else args.system)
    chat.check_system()
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)

    def ask(question):
        startup = None
        if args.timing and device.type != "cpu" and not chat.history:
            # A GPU's first call pays one-time costs that would swamp the TTFT: pay them on a warm-up
            # turn before the chat's first and report them apart. (On CPU a turn takes seconds and its
            # first call costs little.)
            startup = speedups.warm_up(chat, question, args.max_new_tokens, args.temperature, args.top_p)
        try:
            if args.json:
                text = chat.ask(question, **options)
                record = batch.answer_record(None, args.image, question, text, chat)
                if getattr(model, "precision", None) is not None:    # which dtype ran, and why
                    record["precision"] = model.precision.record()
                print(json.dumps(record, ensure_ascii=False), flush=True)
            else:
                streamer = Streamer(tokenizer)
                streamer.finish(chat.ask(question, on_token=streamer, **options))
        except OSError as e:                  # stdout is a full disk, or a pipe whose reader has gone
            raise UsageError(batch.stdout_failed(e)) from None
        if args.timing:
            print_timing(chat, device, startup)

    if args.question is not None:
        ask(args.question)
        return 0
    print(f"Chatting about {args.image}. Empty line or Ctrl-D to quit.", file=sys.stderr)
    while True:
        try:
            question = input("> ")
        except EOFError:
            return 0
        except UnicodeDecodeError:
            print("error: that line is not valid UTF-8 text; check your terminal's encoding", file=sys.stderr)
            continue
        if not question.strip():
            return 0
        try:
            ask(question)
        except InputError as e:               # e.g. a question too long for what is left of the context:
            print(f"error: {e}", file=sys.stderr)   # say so and keep the conversation


def build_parser():
    return infer_parser(__doc__ + "\n" + batch.__doc__)


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        check_options(args)
        from support.chat import AnswerError, InputError
        from support.checkpoint import CheckpointError

        try:
            return batch.batch(args) if args.batch is not None else single(args)
        except (InputError, CheckpointError, AnswerError) as e:
            raise UsageError(str(e)) from None
    except UsageError as e:
        print("error: " + " ".join(str(e).splitlines()), file=sys.stderr)     # one line, whatever it quotes
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
