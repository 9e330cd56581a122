"""A conversation about one image file: checks on what the user typed, the KV cache kept across turns,
and the time each part of a turn takes (the TTFT breakdown of the paper's Fig. 1 and Table 4).

    chat = Chat(model, tokenizer, load_image("photo.jpg"))
    chat.ask("What does the sign say?")     # preprocess, encode, splice, prefill, decode
    chat.ask("And the colour?")             # only this turn's tokens are prefilled
    chat.timing                             # seconds per part of the last turn

infer.py (a question or a chat), support/batch.py (many) and train.py's evaluation ask through it.
"""

import sys
import time
import unicodedata
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

import qwen2
from fastvlm import END, IMAGE, IMAGE_TOKEN_INDEX, STOP_TOKENS, SYSTEM_PROMPT, conversation_ids, square_rgb, turn_ids
from support import speedups
from support.speedups import synchronize


class InputError(ValueError):
    """Bad user input (image, question, options); the message says what is wrong and what to do."""


class AnswerError(ValueError):
    """No answer can be trusted (the logits went NaN or infinite); the message names the likely cause."""


def load_image(path):
    """Open an image file as 8-bit RGB, upright according to its EXIF orientation.

    EXIF orientation is a deliberate difference from Apple's code (which ignores it, so phone photos
    can arrive sideways). 16-bit images are scaled to 8 bits (PIL's own conversion would clip them), and
    floating-point ones in [0, 1] from that range (PIL's would make them black).
    """
    if not str(path):
        raise InputError("the image path is empty; pass an image file")
    path = Path(path)
    try:
        if path.is_dir():
            raise InputError(f"{path} is a folder, not an image; pass an image file (use --batch for many)")
        if path.exists() and not path.is_file():
            raise InputError(f"{path} is not a regular file (a pipe, a device or a socket); save the image to a file")
        if not path.is_file():
            raise InputError(f"image not found: {path}")
    except OSError as e:                                 # a folder on the way that cannot be entered
        raise InputError(f"cannot reach {path} ({e.strerror}); check its folder's permissions") from None
    try:
        return decode_image(path, str(path))
    except PermissionError:
        raise InputError(f"{path} is not readable (permission denied); check the file's permissions") from None


def decode_image(source, name):
    """An image file's path or file object -> 8-bit RGB (see load_image); `name` says which image in errors."""
    try:
        with warnings.catch_warnings():                 # large but allowed: PIL would warn on stderr
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                img.load()                               # decode now, so a truncated file fails here
                img = ImageOps.exif_transpose(img)
    except PermissionError:
        raise
    except Image.DecompressionBombError as e:
        raise InputError(f"{name} is too large to decode safely ({e}); resize it first") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"{name} is not a readable image ({e}); pass a PNG, JPEG or similar") from None
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # high bit depth grayscale
        a = np.nan_to_num(np.asarray(img, dtype=np.float64))
        if img.mode == "F" and a.max() <= 1.0:            # floating-point images usually hold [0, 1]
            top = 1.0
        else:
            top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


@dataclass
class Timing:
    """Seconds spent in each part of a turn. `start(device)`, then `lap(part)` after each part: the time
    since the previous lap goes to that part (after waiting for the device to finish its queued work)."""
    preprocess: float = 0.0
    encoder: float = 0.0
    projector: float = 0.0
    prefill: float = 0.0
    prompt_tokens: int = 0
    decode: float = 0.0
    new_tokens: int = 0
    _device: torch.device = field(default=None, repr=False)
    _last: float = field(default=0.0, repr=False)

    def start(self, device):
        self._device, self._last = device, time.perf_counter()

    def lap(self, part):
        if self._device is None:
            raise ValueError("Timing.lap() before Timing.start(device)")
        synchronize(self._device)
        now = time.perf_counter()
        setattr(self, part, getattr(self, part) + now - self._last)
        self._last = now

    @property
    def ttft(self):
        return self.preprocess + self.encoder + self.projector + self.prefill


# NFC, which Qwen2's tokenizer applies first, can shorten UTF-8 text at most 3 times: a character whose
# canonical decomposition has three code points (U+0390, a Hangul syllable's three jamo) composes from 6
# or 9 bytes into 2 or 3 (tests check every code point).
NFC_MAX_SHRINK = 3


def longest_token_bytes(tokenizer):
    """The most bytes of UTF-8 text that one token of `tokenizer` can stand for (computed once, kept on
    it). A byte-level BPE (Qwen2's) spells each byte as one character of its 256-character alphabet;
    any other token (an added one, such as `<image>`) counts its text's UTF-8 length."""
    longest = getattr(tokenizer, "longest_token_bytes", None)
    if longest is None:
        from tokenizers import pre_tokenizers

        alphabet = set(pre_tokenizers.ByteLevel.alphabet())
        added = {t.content for t in tokenizer.tok.get_added_tokens_decoder().values()}
        longest = max(len(token) if token not in added and alphabet.issuperset(token) else len(token.encode("utf-8"))
                      for token in tokenizer.tok.get_vocab(with_added_tokens=True))
        tokenizer.longest_token_bytes = longest
    return longest


class Chat:
    """Questions about one image (or none: `image=None` is a text-only conversation). The image is encoded
    once; every turn's tokens stay in the KV cache, so a follow-up question only prefills its own few
    tokens (tests check that this equals feeding the whole conversation again, as a stateless
    implementation would)."""

    def __init__(self, model, tokenizer, image, config=None, system=SYSTEM_PROMPT):
        self.model, self.tokenizer, self.image, self.system = model, tokenizer, image, system
        config = config or {}
        self.context = min(config.get("tokenizer_model_max_length", 8192), model.llm.cfg.max_position_embeddings)
        self.stop_ids = {tokenizer.token_id(t) for t in STOP_TOKENS if tokenizer.token_id(t) is not None}
        # Answers use the tokenizer's ids (embedding rows past it are padding), less an `<image>` token at
        # its end: transformers' layout adds one for its placeholder, which no answer contains.
        image_id = tokenizer.token_id(IMAGE)
        self.vocab_limit = image_id if image_id is not None and image_id == len(tokenizer) - 1 else len(tokenizer)
        self.history = []             # every id fed so far, IMAGE_TOKEN_INDEX for the image
        self.image_embeds = None
        self.pos = 0                  # next free cache position
        self.timing = Timing()

    def check_question(self, question):
        """Refuse a question that is empty, not text, or too long for what is left of the context, the
        last from its UTF-8 length alone, before anything is tokenized: tokenizing takes about 100 bytes of
        memory per byte of text, so a 20 MB question would peak at gigabytes before its token count could
        refuse it. A token stands for at most `longest_token_bytes` bytes of the NFC-normalised text, so a
        text of more bytes than that times the tokens left needs more tokens than are left; a question
        that could fit is never refused here (the token count decides, in reserve)."""
        if not question or question.isspace():
            raise InputError("the question is empty; ask something about the image")
        size = 0
        for text, what in ((question, "the question"), (self.system, "the system prompt")):
            try:
                length = len(text) if text.isascii() else len(text.encode("utf-8"))   # ASCII: no copy
            except UnicodeEncodeError:   # undecodable bytes (from a terminal or argv) arrive as surrogates
                raise InputError(f"{what} is not valid UTF-8 text; check your terminal's encoding") from None
            if text is question or not self.history:      # the system prompt is in the first turn only
                size += length
        left = self.context - len(self.history)
        limit = left * longest_token_bytes(self.tokenizer)
        texts = (question,) if self.history else (self.system, question)
        if limit < size <= NFC_MAX_SHRINK * limit and not all(text.isascii() for text in texts):
            # NFC may shorten the text (ASCII it leaves alone); short enough here to measure exactly
            size = sum(len(unicodedata.normalize("NFC", text).encode("utf-8")) for text in texts)
        if size > limit:
            what = "the question" + ("" if self.history else " with the system prompt")
            raise InputError(f"{what} is {size:,} bytes: more than the {left:,} tokens left in the model's "
                             f"context can hold (a token stands for at most {longest_token_bytes(self.tokenizer)} "
                             "bytes); ask a shorter question or start over")

    def check_system(self, name="--system"):
        """Refuse a system prompt that alone, with the image's tokens, leaves no room in the context for a
        question and an answer: every question would fail on it. Measured from its UTF-8 length first, as
        check_question does (a huge one is refused before tokenizing it), then by its tokens."""
        room = self.context - self.model.vision_tower.cfg.num_tokens()   # what the image leaves
        size = len(self.system.encode("utf-8"))
        # a token stands for at most longest_token_bytes bytes of the NFC text, which NFC may shorten
        # NFC_MAX_SHRINK-fold: more bytes than that cannot fit, fewer are counted in tokens
        too_long = size > NFC_MAX_SHRINK * room * longest_token_bytes(self.tokenizer) or \
            len(turn_ids(self.tokenizer, "", first=True, system=self.system)) >= room   # + 1 question, 1 answer
        if too_long:
            raise InputError(f"{name} is too long: with the image's {self.context - room} tokens it leaves no room "
                             f"for a question and an answer in the model's context of {self.context} tokens; "
                             "pass a shorter system prompt")

    def reserve(self, question, max_new_tokens, limit="--max-new-tokens"):
        """The ids of the next turn; the KV cache grown (keeping what it holds) to fit it and its answer.
        `limit` names max_new_tokens in the message that refuses a turn too long for the context."""
        self.check_question(question)
        ids = turn_ids(self.tokenizer, question, first=not self.history, system=self.system, image=self.image is not None)
        if self.history:                                   # the <|im_end|> that closes the answer before it
            ids = self.tokenizer.encode(END) + ids
        needed = len(self.history) + len(ids) + self.image_extra()
        if needed + max_new_tokens > self.context:
            raise InputError(f"the conversation needs {needed} + {max_new_tokens} tokens but the model's context "
                             f"is {self.context}; ask a shorter question, lower {limit} or start over")
        self.grow_cache(needed + max_new_tokens)
        return ids

    def image_extra(self):
        """Positions the image takes beyond its one <image> id (in a turn or in the history): its tokens - 1."""
        return self.model.vision_tower.cfg.num_tokens() - 1 if self.image is not None else 0

    def grow_cache(self, positions):
        """The KV cache grown, keeping what it holds, to at least `positions` (speedups.cache_length's steps)."""
        llm = self.model.llm
        if llm.max_len < positions:
            llm.setup_cache(speedups.cache_length(positions, self.context))

    def encode_image(self, timing=None):
        """The image's (1, N, d) embeddings, computed once per conversation (none for a text-only one);
        `timing` gets the preprocess lap and the encoder's."""
        if self.image_embeds is None and self.image is not None:
            model = self.model
            pixels = speedups.to_pixels(square_rgb(self.image, model.image_size), model.llm.device, model.llm.dtype)
            if timing is not None:
                timing.lap("preprocess")
            self.image_embeds = model.encode_image(pixels, timing=timing)     # (1, N, d)
        return self.image_embeds

    @torch.no_grad()
    def ask(self, question, max_new_tokens=256, temperature=0.0, top_p=1.0, seed=None, on_token=None,
            limit="--max-new-tokens"):
        """The answer to `question`, streamed token by token to `on_token(id)` if given; the turn's
        timing in self.timing."""
        self.check_question(question)                      # before the image is encoded, too
        model, device, t = self.model, self.model.llm.device, Timing()
        t.start(device)
        self.encode_image(timing=t)
        ids = self.reserve(question, max_new_tokens, limit)
        start_pos = self.pos
        self.history += ids
        embeds = model.embed(ids, self.image_embeds if IMAGE_TOKEN_INDEX in ids else None)
        t.prompt_tokens = embeds.shape[1]
        clock = {"start": t._last, "first": None}   # the prefill's share: from the image's last lap, so
        #                                           that tokenizing and embedding the turn count too

        def stream(token):
            if clock["first"] is None:
                synchronize(device)
                clock["first"] = time.perf_counter()
            if on_token is not None:
                on_token(token)

        try:
            out, self.pos = qwen2.generate(
                model.llm, embeds=embeds, start=start_pos, max_new_tokens=max_new_tokens, temperature=temperature,
                top_p=top_p, seed=seed, stop_ids=self.stop_ids, on_token=stream, vocab_limit=self.vocab_limit)
        except qwen2.NonFiniteLogits as e:
            del self.history[len(self.history) - len(ids):]        # the turn was not taken
            raise AnswerError(non_finite_cause(model, str(e))) from None
        finally:            # also when on_token ended the answer (a server's client gone, a stop string)
            synchronize(device)
            end = time.perf_counter()
            first_at = clock["first"] or end
            t.prefill, t.decode = first_at - clock["start"], end - first_at
            self.timing = t
        self.history += out
        t.new_tokens = len(out)
        return self.tokenizer.decode(out).strip()


    @torch.no_grad()
    def replay(self, exchanges):
        """Feed earlier turns of a conversation, [(question, answer), ...], into a new chat without asking:
        their tokens fill the KV cache as if they had been asked here (the answers as given, tokenized), so
        that the next ask() continues them. A server that is sent the whole history uses it."""
        if self.history:
            raise ValueError("replay() starts a conversation; this chat has turns already")
        for question, _ in exchanges:
            self.check_question(question)
        if not exchanges:
            return
        # Every text of it from its UTF-8 length first, as check_question does for one: a huge earlier
        # answer is refused before tokenizing it (about 100 bytes of memory per byte of text)
        size = sum(len(text.encode("utf-8")) for pair in exchanges for text in pair) + len(self.system.encode("utf-8"))
        if size > NFC_MAX_SHRINK * self.context * longest_token_bytes(self.tokenizer):
            raise InputError(f"the conversation is {size:,} bytes: more than the model's context of {self.context:,} "
                             "tokens can hold; start a new conversation")
        ids = conversation_ids(self.tokenizer, exchanges, system=self.system, image=self.image is not None)[0]
        ids = ids[:len(ids) - len(self.tokenizer.encode(END))]     # ask() puts the last <|im_end|> back
        needed = len(ids) + self.image_extra()
        if needed + 1 > self.context:
            raise InputError(f"the conversation needs {needed} tokens but the model's context is {self.context}; "
                             "start a new conversation")
        self.grow_cache(needed + 1)
        embeds = self.model.embed(ids, self.encode_image() if IMAGE_TOKEN_INDEX in ids else None)
        logits = self.model.llm(embeds=embeds, start=0, last_only=True)
        if not torch.isfinite(logits).all():
            raise AnswerError(non_finite_cause(self.model, "the model produced non-finite logits on the conversation"))
        self.history, self.pos = list(ids), embeds.shape[1]


def non_finite_cause(model, what):
    """What to tell a user whose model produced NaN/inf: damaged weights if the loader saw any, else an
    overflow of the dtype."""
    bad = getattr(model, "nonfinite_tensor", None)
    if bad is not None:
        return f"{what}: the checkpoint holds NaN or infinite weights (first: '{bad}'); re-download or re-train it"
    dtype = str(model.llm.dtype).removeprefix("torch.")
    return (f"{what}: the activations overflowed {dtype}; run in bfloat16 or float32 "
            "(--dtype bfloat16, or --dtype float32)")


def answer(model, tokenizer, image_path, question, **kw):
    """One question about one image file -> answer text (the three-line API: load, ask, answer)."""
    return Chat(model, tokenizer, load_image(image_path)).ask(question, **kw)


def print_timing(chat, device, startup=None):
    """The turn's timing on stderr; `startup`: seconds of the warm-up turn run before it (GPU only)."""
    t = chat.timing
    lines = []
    if startup is not None:
        lines.append(f"start-up, first call only: {startup * 1000:.0f} ms (a warm-up turn: the first calls load the "
                     "GPU's kernels and choose their algorithms, and record the prefill and decode graphs where there are some)")
    lines += [f"time to first token: {t.ttft * 1000:.0f} ms" + (" (steady state, after the warm-up)" if startup else ""),
             f"  preprocess {t.preprocess * 1000:.0f} ms | vision encoder {t.encoder * 1000:.0f} ms | "
             f"projector {t.projector * 1000:.1f} ms | LLM prefill {t.prefill * 1000:.0f} ms ({t.prompt_tokens} tokens)"]
    if t.new_tokens > 1 and t.decode > 0:
        lines.append(f"decode: {t.new_tokens} tokens, {(t.new_tokens - 1) / t.decode:.1f} tokens/s")
    lines.append(memory_line(device))
    precision = getattr(getattr(chat, "model", None), "precision", None)   # set by support/options.load
    if precision is not None:
        lines.append(precision.line())
    print("\n".join(lines), file=sys.stderr)


def peak_rss_mib():
    """The process's peak resident memory. Linux's VmHWM belongs to this program's own address space;
    getrusage's ru_maxrss (the fallback elsewhere) carries over the peak of the process that started it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)


def memory_line(device):
    import torch

    rss = f"peak process memory: {peak_rss_mib():.0f} MiB"
    if device.type == "cuda":
        return f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB | {rss}"
    return rss


class Streamer:
    """Prints an answer as its tokens arrive, so that stdout ends with exactly the answer the Python API
    returns. One character can span several byte-level tokens and decodes to U+FFFD until it is whole,
    and the API strips surrounding whitespace: so only whole characters up to the last non-space one are
    printed while decoding, and `finish(answer)` prints the rest of the final answer (a U+FFFD included
    when the token limit cut a character in two)."""

    def __init__(self, tokenizer, out=None):
        self.tokenizer, self.out, self.ids, self.shown = tokenizer, out or sys.stdout, [], ""

    def __call__(self, token):
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids).strip()
        if not text.endswith("\ufffd") and text.startswith(self.shown):
            self.out.write(text[len(self.shown):])
            self.out.flush()
            self.shown = text

    def finish(self, answer):
        if answer.startswith(self.shown):
            self.out.write(answer[len(self.shown):])
        self.out.write("\n")
        self.out.flush()
