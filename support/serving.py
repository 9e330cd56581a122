"""serve.py's model side: OpenAI chat requests checked and turned into a conversation, the conversations
kept with their KV caches, and an answer generated with stop strings, as text and as stream chunks.

Nothing here knows HTTP (serve.py does); everything here runs on the one thread that owns the model,
except `parse_request`, which runs before a request is queued.

    request = parse_request(body, served="fastvlm-tiny")       # RequestError(status, message) if not
    pool = Conversations(model, tokenizer, config, keep=8)
    result = pool.answer(request, on_text=print)              # text, finish_reason, usage, timing

A request carries the whole conversation (the API is stateless). The pool keeps the last `keep`
conversations, each with its own KV cache: a request whose earlier turns (same image, same system
prompt, same questions and answers) are those of a kept conversation continues it, and prefills only
its new turn, as infer.py's chat does; any other starts a new one (replaying its earlier turns).
"""

import base64
import binascii
import hashlib
import io
import math
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field

from PIL import Image

from fastvlm import SYSTEM_PROMPT
from support.chat import AnswerError, Chat, InputError, decode_image
from support.options import MAX_SAMPLING_SEED

MAX_STOP_STRINGS = 4            # as OpenAI's API
MAX_STOP_CHARS = 256
UNSUPPORTED = {"tools": "tools (function calling)", "tool_choice": "tool_choice", "functions": "functions",
               "function_call": "function_call", "audio": "audio output", "prediction": "predicted outputs"}


class RequestError(Exception):
    """A request that cannot be answered: an HTTP status and a message saying what to change."""

    def __init__(self, status, message, param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self):
        kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                413: "invalid_request_error", 429: "rate_limit_error"}.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass
class Request:
    exchanges: list                 # [(question, answer)] before the last question
    question: str
    image_bytes: bytes = None       # the image file, decoded on the model thread only when a new
    image_digest: str = ""          # conversation needs it; its sha256 matches a kept conversation
    system: str = SYSTEM_PROMPT
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = None
    stop: list = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


def parse_request(body, served, default_max_tokens=256):
    """The JSON body of POST /v1/chat/completions -> Request; RequestError(400/404) names what is wrong."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    body = {k: v for k, v in body.items() if v is not None}    # null means "the default", as OpenAI reads it
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError(400, "'model' is required: the name GET /v1/models lists", "model")
    if model != served:
        raise RequestError(404, f"model '{model[:100]}' is not served here; this server serves '{served}'",
                           "model", "model_not_found")
    for key, what in UNSUPPORTED.items():
        if body.get(key) not in (None, [], "none"):
            raise RequestError(400, f"{what} is not supported by this server", key)
    if body.get("n", 1) != 1:
        raise RequestError(400, "'n' must be 1: this server returns one answer per request", "n")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise RequestError(400, "logprobs are not supported by this server", "logprobs")
    response_format = body.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise RequestError(400, "response_format other than text is not supported by this server", "response_format")
    request = Request(exchanges=[], question="", system=SYSTEM_PROMPT)
    parse_messages(body.get("messages"), request)
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    request.max_tokens = default_max_tokens if limit is None else whole(limit, "max_tokens", 1, None)
    request.temperature = number(body.get("temperature", 1.0), "temperature", 0.0, 2.0)
    request.top_p = number(body.get("top_p", 1.0), "top_p", 0.0, 1.0)
    if request.top_p == 0:
        raise RequestError(400, "'top_p' must be in (0, 1]", "top_p")
    seed = body.get("seed")
    request.seed = None if seed is None else whole(seed, "seed", 0, MAX_SAMPLING_SEED)
    request.stop = stop_strings(body.get("stop"))
    request.stream = flag(body.get("stream", False), "stream")
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise RequestError(400, "'stream_options' must be an object", "stream_options")
        request.include_usage = flag(options.get("include_usage", False), "stream_options.include_usage")
    return request


def whole(value, name, low, high):
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f"at least {low}"
        raise RequestError(400, f"'{name}' must be a whole number {bound}", name)
    return value


def number(value, name, low, high):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise RequestError(400, f"'{name}' must be a number from {low:g} to {high:g}", name)
    return float(value)


def flag(value, name):
    if not isinstance(value, bool):
        raise RequestError(400, f"'{name}' must be true or false", name)
    return value


def stop_strings(stop):
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS or \
            not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops):
        raise RequestError(400, f"'stop' must be a string or a list of at most {MAX_STOP_STRINGS} non-empty strings "
                                f"of at most {MAX_STOP_CHARS} characters", "stop")
    return stops


def parse_messages(messages, request):
    """System messages, then user and assistant turns alternating, ending with a user turn; at most one
    image, in a user turn (the model was trained with one)."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list", "messages")
    systems, turns = [], []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(400, f"{where} must be an object with 'role' and 'content'", "messages")
        role = message.get("role")
        if role in ("system", "developer"):
            if turns:
                raise RequestError(400, f"{where}: a system message must come before the conversation", "messages")
            systems.append(text_of(message.get("content"), where, request, images=False))
        elif role in ("user", "assistant"):
            expected = "user" if not turns or turns[-1][0] == "assistant" else "assistant"
            if role != expected:
                raise RequestError(400, f"{where}: expected a '{expected}' message (user and assistant turns "
                                        "alternate, starting with the user's)", "messages")
            turns.append((role, text_of(message.get("content"), where, request, images=role == "user")))
        else:
            raise RequestError(400, f"{where}: role must be system, user or assistant, not {str(role)[:40]!r}",
                               "messages")
    if not turns or turns[-1][0] != "user":
        raise RequestError(400, "the last message must be the user's question", "messages")
    if systems:
        request.system = "\n".join(systems)
    texts = [t for _, t in turns]
    request.exchanges = list(zip(texts[:-1:2], texts[1:-1:2]))
    request.question = texts[-1]
    if not request.question.strip():
        raise RequestError(400, "the last user message has no text: ask something", "messages")


def text_of(content, where, request, images):
    """A message's content (a string, or a list of text and image_url parts) -> its text; an image part
    goes into request.image_bytes (checked, not yet decoded)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RequestError(400, f"{where}.content must be a string or a list of parts", "messages")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url" and images:
            if request.image_bytes is not None:
                raise RequestError(400, "only one image per conversation: FastVLM was trained with one image",
                                   "messages")
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url      # the object, or a bare string
            request.image_bytes, request.image_digest = image_from_url(url, f"{where}.content[{j}]")
        elif kind == "image_url":
            raise RequestError(400, f"{where}: images go in user messages", "messages")
        else:
            raise RequestError(400, f"{where}.content[{j}] must be a text or image_url part", "messages")
    return "\n".join(texts)


def image_from_url(url, where):
    """A data: URL (base64) -> (the image file's bytes, their sha256), its header checked: an image PIL can
    open, within PIL's size limit (infer.py's). Remote URLs are refused: this server fetches nothing.
    The pixels are decoded later, on the model's thread, one image at a time."""
    if not isinstance(url, str) or not url:
        raise RequestError(400, f"{where}: image_url needs a 'url'", "messages")
    if not url.startswith("data:"):
        raise RequestError(400, f"{where}: only data: URLs are accepted (this server fetches nothing); send the "
                                "image as data:image/png;base64,...", "messages")
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise RequestError(400, f"{where}: the data URL must be base64: data:image/...;base64,...", "messages")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, f"{where}: the image's base64 is damaged", "messages") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:            # the header only: format and size
                width, height = img.size
    except Image.DecompressionBombError as e:
        raise RequestError(400, f"{where}'s image is too large to decode safely ({e}); resize it first",
                           "messages") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise RequestError(400, f"{where}'s image is not a readable image ({e}); send a PNG, JPEG or similar",
                           "messages") from None
    if Image.MAX_IMAGE_PIXELS and width * height > 2 * Image.MAX_IMAGE_PIXELS:      # where PIL refuses to decode
        raise RequestError(400, f"{where}'s image is {width} x {height} pixels, too large to decode safely; "
                                "resize it first", "messages")
    return data, hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------------------------------
# Answering, on the model's thread.
# ----------------------------------------------------------------------------------------------------

class Cancelled(Exception):
    """Raised from inside generation when the client has gone: the model is freed at the next token."""


class TextStream:
    """Token ids -> the answer's text as it grows, as Chat.ask returns it (decoded, stripped), cut before
    the first stop string. add() returns what may be shown so far: whole characters, not a trailing
    space (the final answer is stripped), and not a tail that could still become a stop string;
    finish() the whole answer."""

    def __init__(self, tokenizer, stops):
        self.tokenizer, self.stops, self.ids, self.stopped = tokenizer, stops, [], False

    def add(self, token):
        self.ids.append(token)
        full = self.tokenizer.decode(self.ids).lstrip()
        cut = min((full.find(s) for s in self.stops if s in full), default=-1)
        if cut >= 0:
            self.stopped, self.final = True, full[:cut].rstrip()
            return self.final
        hold = max((k for s in self.stops for k in range(1, len(s)) if full.endswith(s[:k])), default=0)
        shown = full[:len(full) - hold]
        shown = shown[:-1] if shown.endswith("\ufffd") else shown        # half a character: wait for the rest
        return shown.rstrip()

    def finish(self):
        if self.stopped:
            return self.final
        return self.tokenizer.decode(self.ids).strip()


@dataclass
class Result:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    timing: dict


class Conversations:
    """The kept conversations, most recently used last, each a Chat with its own KV cache."""

    def __init__(self, model, tokenizer, config, keep=8):
        self.model, self.tokenizer, self.config, self.keep = model, tokenizer, config, keep
        self.kept = OrderedDict()     # key of the conversation so far -> (chat, its caches, its max_len)
        self.last_prefill_tokens = 0  # of the latest answer: every token it prefilled (tests check reuse)
        self.replayed = 0

    @staticmethod
    def key(request, exchanges):
        return (request.image_digest, request.system, tuple(exchanges))

    def _caches(self):
        llm = self.model.llm
        return [layer.self_attn.cache for layer in llm.layers], llm.max_len

    def _install(self, caches, max_len):
        llm = self.model.llm
        for layer, cache in zip(llm.layers, caches):
            layer.self_attn.cache = cache
        llm.max_len = max_len

    def chat_for(self, request):
        """A kept chat whose turns are the request's earlier ones, its cache installed; or a new one
        that has replayed them."""
        found = self.kept.pop(self.key(request, request.exchanges), None)
        if found is not None:
            chat, caches, max_len = found
            self._install(caches, max_len)
            self.replayed = 0
            return chat
        image = None if request.image_bytes is None else decode_image(io.BytesIO(request.image_bytes), "the image")
        self.model.llm.drop_cache()                     # a new cache: the kept ones stay as they are
        chat = Chat(self.model, self.tokenizer, image, self.config, system=request.system)
        chat.check_system("the system message")
        chat.replay(request.exchanges)
        self.replayed = chat.pos                        # the earlier turns' tokens, prefilled again
        return chat

    def answer(self, request, on_text=None, cancelled=lambda: False):
        """Answer the request's last question; on_text(text so far) after each token. Raises
        RequestError for a question the model cannot take, Cancelled when `cancelled()` turns true."""
        try:
            chat = self.chat_for(request)
        except (InputError, AnswerError) as e:
            raise RequestError(400, str(e), "messages") from None
        stream = TextStream(self.tokenizer, request.stop)

        def on_token(token):
            if cancelled():
                raise Cancelled()
            text = stream.add(token)
            if on_text is not None:
                on_text(text)
            if stream.stopped:
                raise Cancelled()                        # a stop string: no more tokens are needed

        try:
            chat.ask(request.question, max_new_tokens=request.max_tokens, temperature=request.temperature,
                     top_p=request.top_p, seed=request.seed, on_token=on_token, limit="max_tokens")
        except InputError as e:        # refused before anything was fed: the conversation is as it was
            if chat.history:
                self.kept[self.key(request, request.exchanges)] = (chat, *self._caches())
            raise RequestError(400, str(e), "messages") from None
        except AnswerError as e:
            raise RequestError(500, str(e)) from None
        except Cancelled:
            if not stream.stopped:
                raise
            kept = False                                 # the chat's state stops mid-answer: not kept
        else:
            kept = True
        tokens = len(stream.ids)
        image_tokens = chat.model.vision_tower.cfg.num_tokens() if chat.image is not None else 0
        # the prompt as the model saw it: every id of the conversation before this answer, the image's
        # tokens in place of its one placeholder
        prompt = len(chat.history) - (tokens if kept else 0) + max(image_tokens - 1, 0)
        self.last_prefill_tokens = self.replayed + chat.timing.prompt_tokens
        if kept:
            exchanges = [*request.exchanges, (request.question, stream.finish())]
            self.kept[self.key(request, exchanges)] = (chat, *self._caches())
            while len(self.kept) > self.keep:
                self.kept.popitem(last=False)
        finish = "stop" if stream.stopped or tokens < request.max_tokens else "length"
        return Result(stream.finish(), finish, prompt, tokens, timing_of(chat.timing, tokens, image_tokens))


def timing_of(t, tokens, image_tokens):
    """The response's `timing` object: milliseconds of each part of the time to first token, decode speed."""
    return {"preprocess_ms": round(t.preprocess * 1e3, 1), "encoder_ms": round(t.encoder * 1e3, 1),
            "projector_ms": round(t.projector * 1e3, 2), "prefill_ms": round(t.prefill * 1e3, 1),
            "ttft_ms": round(t.ttft * 1e3, 1), "prompt_tokens_prefilled": t.prompt_tokens,
            "decode_tokens_per_s": round((tokens - 1) / t.decode, 2) if tokens > 1 and t.decode > 0 else None,
            "image_tokens": image_tokens}


def now():
    return int(time.time())
