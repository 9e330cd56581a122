"""Ask FastVLM about an image.

    python infer.py photo.jpg "What does the sign say?"                 # the embedded tiny model
    python infer.py photo.jpg "What does the sign say?" --model llava-fastvithd_0.5b_stage3
    python infer.py photo.jpg --model FOLDER                            # interactive chat about the image

Greedy decoding by default (deterministic); the answer streams to stdout as it is generated.
`--timing` prints the time to first token split into its parts, then decode speed and peak memory.
Problems with the input are reported in one line on stderr with a non-zero exit code.
"""

import argparse
import sys
from pathlib import Path

DEFAULT_MODEL = Path(__file__).resolve().parent / "models" / "fastvlm-tiny"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", help="image file (PNG, JPEG, ...)")
    p.add_argument("question", nargs="?", help="question about the image; omit it for an interactive chat")
    p.add_argument("--model", type=Path, default=None,
                   help=f"FastVLM folder (official checkpoint or train.py output); default: {DEFAULT_MODEL.name}")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (temperature > 0)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--timing", action="store_true", help="print the TTFT breakdown and decode speed")
    p.add_argument("--plain", action="store_true",
                   help="run the plain model files, without the speed step of speedups.py (slower; in float32 the same answers)")
    return p.parse_args(argv)


class UsageError(Exception):
    pass


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
    import torch

    if name == "auto":
        return {"cuda": torch.bfloat16, "mps": torch.float16}.get(device.type, torch.float32)
    if name == "float16" and device.type == "cpu":
        raise UsageError("float16 is refused on CPU (slow and poorly supported there); "
                         "use --dtype float32 or bfloat16")
    return getattr(torch, name)


def check_options(args):
    if args.max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be at least 1")
    if args.temperature < 0:
        raise UsageError("--temperature must be >= 0 (0 = greedy)")
    if not 0 < args.top_p <= 1:
        raise UsageError("--top-p must be in (0, 1]")
    if args.question is not None and not args.question.strip():
        raise UsageError("the question is empty; ask something about the image, or omit it to chat")


def print_timing(chat, device):
    import torch

    t = chat.timing
    lines = [f"time to first token: {t.ttft * 1000:.0f} ms",
             f"  preprocess {t.preprocess * 1000:.0f} ms | vision encoder {t.encoder * 1000:.0f} ms | "
             f"projector {t.projector * 1000:.1f} ms | LLM prefill {t.prefill * 1000:.0f} ms ({t.prompt_tokens} tokens)"]
    if t.new_tokens > 1 and t.decode > 0:
        lines.append(f"decode: {t.new_tokens} tokens, {(t.new_tokens - 1) / t.decode:.1f} tokens/s")
    if device.type == "cuda":
        lines.append(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB")
    else:
        import resource
        lines.append(f"peak process memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    print("\n".join(lines), file=sys.stderr)


def main(argv=None):
    args = parse_args(argv)
    try:
        check_options(args)
        import torch

        from checkpoint import CheckpointError
        from fastvlm import Chat, FastVLM, InputError, load_image

        try:
            image = load_image(args.image)                 # fail fast, before loading a model
            device = pick_device(args.device)
            dtype = pick_dtype(args.dtype, device)
            folder = args.model or DEFAULT_MODEL
            if args.model is None and not DEFAULT_MODEL.is_dir():
                raise UsageError(f"the embedded default model ({DEFAULT_MODEL}) is not in this checkout yet; "
                                 "pass --model FOLDER with an official FastVLM checkpoint (see README)")
            torch.set_grad_enabled(False)
            model, tokenizer, config = FastVLM.from_pretrained(folder, device=device, dtype=dtype,
                                                               fast=not args.plain)
            chat = Chat(model, tokenizer, image, config)

            def stream(token):
                # Decode the whole answer so far and print what is new: one character can span
                # several byte-level tokens, and a half character decodes to U+FFFD until it is whole.
                stream.ids.append(token)
                text = tokenizer.decode(stream.ids).lstrip()
                if not text.endswith("\ufffd"):
                    sys.stdout.write(text[len(stream.shown):])
                    sys.stdout.flush()
                    stream.shown = text

            def ask(question):
                stream.ids, stream.shown = [], ""
                chat.ask(question, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_p=args.top_p, seed=args.seed, on_token=stream)
                sys.stdout.write("\n")
                sys.stdout.flush()
                if args.timing:
                    print_timing(chat, device)

            if args.question is not None:
                ask(args.question)
                return 0
            print(f"Chatting about {args.image}. Empty line or Ctrl-D to quit.", file=sys.stderr)
            while True:
                try:
                    question = input("> ")
                except EOFError:
                    return 0
                if not question.strip():
                    return 0
                ask(question)
        except (InputError, CheckpointError) as e:
            raise UsageError(str(e)) from None
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
