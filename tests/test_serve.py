"""serve.py: the OpenAI chat API over the same model and chat code as infer.py, tested with the real
`openai` client against a real uvicorn server on 127.0.0.1 (a free port, bounded requests, stopped at the
end of the module).

* Answers: the same as the Python API's (greedy at temperature 0), streamed or not, with usage (the
  image's tokens counted) and the timing of each part; stop strings cut the answer, across tokens.
* Conversations: a follow-up continues its kept KV cache and prefills only its own turn (A, B, then A
  again); with nothing kept, the history is replayed and the answer is the same.
* Hostile and careless clients: every refusal is an OpenAI error object with the right status, as the
  client raises it; a full queue is 429 at once; 50 clients at once each get their own answer; a client
  that hangs up mid-stream frees the model; a stalled client times out without holding it.
"""

import base64
import io
import json
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
import torch
from PIL import Image

import fastvlm as FV
import serve
from support import loading
from support import chat as CH
from support import serving

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "models" / "fastvlm-tiny"
SHAPES = ROOT / "examples" / "shapes.png"
pytestmark = pytest.mark.inference


@contextmanager
def running(app):
    """The app under uvicorn on 127.0.0.1, a free port, in a thread; yields its base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", timeout_keep_alive=5))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def tiny():
    torch.set_grad_enabled(False)
    return loading.load_model(TINY)


@pytest.fixture(scope="module")
def server(tiny):
    app = serve.create_app(*tiny, "fastvlm-tiny", conversations=8)
    with running(app) as url:
        yield url, app


def client(url, key="none", **kw):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60, **kw)


def data_url(path_or_image):
    if isinstance(path_or_image, Image.Image):
        buf = io.BytesIO()
        path_or_image.save(buf, "PNG")
        data = buf.getvalue()
    else:
        data = Path(path_or_image).read_bytes()
    return "data:image/png;base64," + base64.b64encode(data).decode()


def ask(question, image=SHAPES):
    return {"role": "user", "content": [{"type": "text", "text": question},
                                        {"type": "image_url", "image_url": {"url": data_url(image), "detail": "auto"}}]}


def api_answer(tiny, question, image=SHAPES, history=(), system=FV.SYSTEM_PROMPT, **kw):
    """What infer.py answers (the Python API's Chat), after asking `history`'s questions first."""
    model, tokenizer, config = tiny
    chat = CH.Chat(model, tokenizer, CH.load_image(image) if isinstance(image, (str, Path)) else image, config,
                   system=system)
    for q in history:
        chat.ask(q, **kw)
    return chat.ask(question, **kw), chat


def scene(seed):
    from shapes_data import draw_scene, random_scene
    import random

    rng = random.Random(seed)
    return draw_scene(random_scene(rng), rng)


# ----------------------------------------------------------------------------------------------------
# Answers
# ----------------------------------------------------------------------------------------------------

def test_an_answer_is_infer_pys_with_usage_and_timing(server, tiny):
    url, _ = server
    r = client(url).chat.completions.create(model="fastvlm-tiny", messages=[ask("What color is the circle?")],
                                            temperature=0)
    expected, chat = api_answer(tiny, "What color is the circle?")
    assert r.choices[0].message.content == expected and expected.strip()
    assert r.choices[0].finish_reason == "stop" and r.object == "chat.completion" and r.model == "fastvlm-tiny"
    assert r.usage.prompt_tokens == chat.timing.prompt_tokens        # the image's 16 tokens included
    assert r.usage.completion_tokens == chat.timing.new_tokens and r.usage.total_tokens == r.usage.prompt_tokens + \
        r.usage.completion_tokens
    timing = r.model_extra["timing"]
    assert timing["image_tokens"] == 16 and all(timing[k] > 0 for k in ("preprocess_ms", "encoder_ms", "prefill_ms",
                                                                          "ttft_ms"))


def test_models_lists_the_served_name(server):
    url, _ = server
    assert [m.id for m in client(url).models.list()] == ["fastvlm-tiny"]


def test_streamed_answer_is_the_same_with_usage_and_timing_last(server, tiny):
    url, _ = server
    messages = [ask("Describe the image.")]
    whole = client(url).chat.completions.create(model="fastvlm-tiny", messages=messages, temperature=0)
    chunks = list(client(url).chat.completions.create(model="fastvlm-tiny", messages=messages, temperature=0,
                                                      stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content == api_answer(tiny, "Describe the image.")[0]
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 2      # it did stream
    last_choice = [c for c in chunks if c.choices][-1]
    assert last_choice.choices[0].finish_reason == "stop" and last_choice.model_extra["timing"]["ttft_ms"] > 0
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_stream_ends_with_done(server):
    url, _ = server
    body = {"model": "fastvlm-tiny", "messages": [ask("How many shapes are there?")], "stream": True, "temperature": 0}
    lines = httpx.post(url + "/v1/chat/completions", json=body, timeout=60).text.strip().split("\n\n")
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: {") for line in lines[:-1])


def test_length_limit_sampling_seed_and_system(server, tiny):
    url, _ = server
    c = client(url)
    cut = c.chat.completions.create(model="fastvlm-tiny", messages=[ask("Describe the image.")], temperature=0,
                                    max_completion_tokens=2)
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 2
    sampled = [c.chat.completions.create(model="fastvlm-tiny", messages=[ask("Describe the image.")], temperature=1.5,
                                         top_p=0.9, seed=7, max_tokens=12).choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1] == api_answer(tiny, "Describe the image.", temperature=1.5, top_p=0.9, seed=7,
                                                  max_new_tokens=12)[0]
    system = "You answer in one word."
    r = c.chat.completions.create(model="fastvlm-tiny", temperature=0, messages=[
        {"role": "system", "content": system}, ask("What color is the circle?")])
    expected, chat = api_answer(tiny, "What color is the circle?", system=system)
    assert r.choices[0].message.content == expected and r.usage.prompt_tokens == chat.timing.prompt_tokens


def test_text_only_request(server, tiny):
    url, _ = server
    r = client(url).chat.completions.create(model="fastvlm-tiny", temperature=0, max_tokens=8,
                                            messages=[{"role": "user", "content": "Hello, who are you?"}])
    assert r.choices[0].message.content == api_answer(tiny, "Hello, who are you?", image=None, max_new_tokens=8)[0]
    assert r.model_extra["timing"]["image_tokens"] == 0


def test_stop_strings_cut_the_answer_across_tokens(server, tiny):
    url, _ = server
    full = api_answer(tiny, "Describe the image.")[0]                    # e.g. "a red circle and a blue square"
    stop = full[3:7]                                                     # inside the answer, across tokens
    r = client(url).chat.completions.create(model="fastvlm-tiny", messages=[ask("Describe the image.")],
                                            temperature=0, stop=[stop, "zzzz"])
    assert r.choices[0].message.content == full[:full.index(stop)].strip() and r.choices[0].finish_reason == "stop"
    streamed = client(url).chat.completions.create(model="fastvlm-tiny", messages=[ask("Describe the image.")],
                                                   temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == r.choices[0].message.content


class Pieces:
    """A tokenizer whose ids are pieces of text (for TextStream)."""

    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids)


def test_text_stream_holds_back_a_possible_stop_and_half_characters():
    stream = serving.TextStream(Pieces([" he", "llo w", "orld", "\ufffd", "é"]), ["lo wor", "xyz"])
    assert stream.add(0) == "he"
    assert stream.add(1) == "hel"                     # "lo w" could start "lo wor": held back
    assert stream.add(2) == "hel" and stream.stopped and stream.finish() == "hel"
    plain = serving.TextStream(Pieces(["a ", "b", "\ufffd"]), [])
    assert plain.add(0) == "a" and plain.add(1) == "a b" and plain.add(2) == "a b" and plain.finish() == "a b\ufffd"


# ----------------------------------------------------------------------------------------------------
# Conversations
# ----------------------------------------------------------------------------------------------------

def test_a_follow_up_prefills_only_its_own_turn(server, tiny):
    """A, then B, then A's follow-up: all three answers are the Python API's, and the third prefilled only
    its new turn (the kept conversation of A, not A replayed)."""
    url, app = server
    c, pool = client(url), app.state.pool
    image_b = scene(3)
    a1 = c.chat.completions.create(model="fastvlm-tiny", messages=[ask("What color is the circle?")], temperature=0)
    assert pool.last_prefill_tokens == a1.usage.prompt_tokens
    b1 = c.chat.completions.create(model="fastvlm-tiny", messages=[ask("Describe the image.", image_b)], temperature=0)
    follow = [ask("What color is the circle?"), {"role": "assistant", "content": a1.choices[0].message.content},
              {"role": "user", "content": "How many shapes are there?"}]
    a2 = c.chat.completions.create(model="fastvlm-tiny", messages=follow, temperature=0)
    expected, chat = api_answer(tiny, "How many shapes are there?", history=["What color is the circle?"])
    assert a1.choices[0].message.content == api_answer(tiny, "What color is the circle?")[0]
    assert b1.choices[0].message.content == api_answer(tiny, "Describe the image.", image=image_b)[0]
    assert a2.choices[0].message.content == expected
    model, tokenizer, _ = tiny
    own_turn = len(tokenizer.encode(FV.END) + FV.turn_ids(tokenizer, "How many shapes are there?", first=False))
    assert pool.last_prefill_tokens == own_turn == chat.timing.prompt_tokens < 20
    assert a2.usage.prompt_tokens == a1.usage.prompt_tokens + a1.usage.completion_tokens + own_turn
    # B's history about another image is another conversation: B's kept one does not match, all is prefilled.
    other = [ask("Describe the image."), {"role": "assistant", "content": b1.choices[0].message.content},
             {"role": "user", "content": "How many shapes are there?"}]
    r = c.chat.completions.create(model="fastvlm-tiny", messages=other, temperature=0)
    assert pool.last_prefill_tokens == r.usage.prompt_tokens > 20


def test_with_nothing_kept_the_history_is_replayed_to_the_same_answer(tiny):
    app = serve.create_app(*tiny, "fastvlm-tiny", conversations=0)
    with running(app) as url:
        c = client(url)
        a1 = c.chat.completions.create(model="fastvlm-tiny", messages=[ask("What color is the circle?")], temperature=0)
        follow = [ask("What color is the circle?"), {"role": "assistant", "content": a1.choices[0].message.content},
                  {"role": "user", "content": "How many shapes are there?"}]
        a2 = c.chat.completions.create(model="fastvlm-tiny", messages=follow, temperature=0)
        assert app.state.pool.last_prefill_tokens == a2.usage.prompt_tokens    # the whole conversation again
        model, tokenizer, _ = tiny                                              # ... which is the chat's own
        own_turn = len(tokenizer.encode(FV.END) + FV.turn_ids(tokenizer, "How many shapes are there?", first=False))
        assert a2.usage.prompt_tokens == a1.usage.prompt_tokens + a1.usage.completion_tokens + own_turn
    assert a2.choices[0].message.content == api_answer(tiny, "How many shapes are there?",
                                                       history=["What color is the circle?"])[0]


# ----------------------------------------------------------------------------------------------------
# Hostile and careless clients
# ----------------------------------------------------------------------------------------------------

REFUSED = {
    "two images": ({"messages": [ask("q"), {"role": "assistant", "content": "a"}, ask("again")]}, 400, "one image"),
    "n > 1": ({"messages": [ask("q")], "n": 2}, 400, "'n' must be 1"),
    "tools": ({"messages": [ask("q")], "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    "json output": ({"messages": [ask("q")], "response_format": {"type": "json_object"}}, 400, "response_format"),
    "logprobs": ({"messages": [ask("q")], "logprobs": True}, 400, "logprobs"),
    "remote url": ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "http://example.com/cat.png"}}, {"type": "text", "text": "q"}]}]}, 400, "fetches nothing"),
    "bad base64": ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64,@@@@"}}, {"type": "text", "text": "q"}]}]}, 400, "base64"),
    "not an image": ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64," + base64.b64encode(b"GIF89a not really").decode()}},
        {"type": "text", "text": "q"}]}]}, 400, "not a readable image"),
    "no question": ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "alternate"),
    "wrong model": ({"model": "gpt-4o", "messages": [ask("q")]}, 404, "not served here"),
    "max_tokens 0": ({"messages": [ask("q")], "max_tokens": 0}, 400, "max_tokens"),
    "temperature not a number": ({"messages": [ask("q")], "temperature": "hot"}, 400, "temperature"),
    "temperature 3": ({"messages": [ask("q")], "temperature": 3}, 400, "temperature"),
    "image too large": ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": data_url(Image.new("1", (20000, 20000)))}}, {"type": "text", "text": "q"}]}]}, 400, "too large"),
    "too long": ({"messages": [ask("word " * 9000)]}, 400, "context"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_refusals_are_openai_errors_with_their_status(server, case):
    url, _ = server
    body, status, fragment = REFUSED[case]
    r = httpx.post(url + "/v1/chat/completions", json={"model": "fastvlm-tiny", **body}, timeout=60)
    error = r.json()["error"]
    assert r.status_code == status and fragment in error["message"] and error["type"], r.text
    assert "Traceback" not in r.text


def test_the_client_raises_them_as_openai_errors(server):
    url, _ = server
    c = client(url)
    with pytest.raises(openai.BadRequestError, match="one image"):
        c.chat.completions.create(model="fastvlm-tiny", messages=REFUSED["two images"][0]["messages"])
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="gpt-4o", messages=[ask("q")])


@pytest.mark.parametrize("body,status,fragment", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (b"[" * 100000, 400, "not valid JSON"),
])
def test_bad_bodies(server, body, status, fragment):
    url, _ = server
    r = httpx.post(url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == status and fragment in r.json()["error"]["message"]


def test_a_huge_body_is_413_before_it_is_read(tiny):
    app = serve.create_app(*tiny, "fastvlm-tiny", max_body=1024 * 1024)
    with running(app) as url:
        r = httpx.post(url + "/v1/chat/completions", content=b"x" * (2 * 1024 * 1024), timeout=60)
        assert r.status_code == 413 and "MiB" in r.json()["error"]["message"]
        chunked = httpx.post(url + "/v1/chat/completions", content=iter([b"x" * 65536] * 40), timeout=60)
        assert chunked.status_code == 413


def test_an_api_key_is_required_when_set(tiny):
    app = serve.create_app(*tiny, "fastvlm-tiny", api_key="s3cret")
    with running(app) as url:
        with pytest.raises(openai.AuthenticationError):
            client(url, "wrong").chat.completions.create(model="fastvlm-tiny", messages=[ask("q")])
        assert httpx.get(url + "/v1/models").status_code == 401
        r = client(url, "s3cret").chat.completions.create(model="fastvlm-tiny", messages=[ask("What color is the circle?")],
                                                         temperature=0)
        assert r.choices[0].message.content


class Held:
    """A Conversations whose answers wait for a gate: the model is busy for as long as a test wants."""

    def __init__(self, pool):
        self.pool, self.gate, self.started, self.results = pool, threading.Event(), threading.Event(), []

    def answer(self, request, on_text=None, cancelled=lambda: False):
        self.started.set()
        self.gate.wait(60)
        try:
            result = self.pool.answer(request, on_text, cancelled)
        except Exception as e:
            self.results.append(e)
            raise
        self.results.append(result)
        return result


def test_a_full_queue_answers_429_at_once(tiny, monkeypatch):
    held, real = {}, serving.Conversations

    def conversations(*args, **kw):
        held["pool"] = Held(real(*args, **kw))
        return held["pool"]

    monkeypatch.setattr(serving, "Conversations", conversations)
    app = serve.create_app(*tiny, "fastvlm-tiny", queue=2)
    with running(app) as url, ThreadPoolExecutor(2) as pool:
        body = {"model": "fastvlm-tiny", "messages": [ask("What color is the circle?")], "temperature": 0}
        first = [pool.submit(httpx.post, url + "/v1/chat/completions", json=body, timeout=60) for _ in range(2)]
        assert held["pool"].started.wait(30)
        time.sleep(0.3)                                          # the second is queued behind the first
        t = time.monotonic()
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 429 and time.monotonic() - t < 2 and "busy" in r.json()["error"]["message"]
        held["pool"].gate.set()
        assert [f.result().status_code for f in first] == [200, 200]
        assert httpx.post(url + "/v1/chat/completions", json=body, timeout=60).status_code == 200   # room again


def test_fifty_clients_at_once_each_get_their_own_answer(server, tiny):
    url, _ = server
    questions = [(scene(i), q) for i in range(10) for q in ("Describe the image.", "How many shapes are there?",
                                                            "What color is the circle?", "Is there a red square?",
                                                            "What shape is the blue object?")]

    def one(item):
        image, question = item
        r = client(url).chat.completions.create(model="fastvlm-tiny", messages=[ask(question, image)], temperature=0)
        return r.choices[0].message.content

    with ThreadPoolExecutor(50) as pool:
        got = list(pool.map(one, questions))
    assert len(got) == 50
    assert got == [api_answer(tiny, q, image=image)[0] for image, q in questions]


def test_a_client_that_hangs_up_mid_stream_frees_the_model(small_model_dir):
    """Random weights rarely say the stop token: without the hang-up this answer would run 4,000 tokens."""
    model = loading.load_model(small_model_dir)
    app = serve.create_app(*model, "m")
    answers = []
    pool = app.state.pool
    original = pool.answer

    def recording(request, on_text=None, cancelled=lambda: False):
        try:
            answers.append(original(request, on_text, cancelled))
            return answers[-1]
        except serving.Cancelled:
            answers.append("cancelled")
            raise
    pool.answer = recording
    with running(app) as url:
        body = {"model": "m", "messages": [ask("Describe.")], "stream": True, "max_tokens": 4000, "temperature": 0}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
        t = time.monotonic()
        r = httpx.post(url + "/v1/chat/completions", timeout=60,
                       json={"model": "m", "messages": [ask("Describe.")], "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200 and time.monotonic() - t < 20
    assert answers[0] == "cancelled"


def test_a_stalled_client_times_out_without_holding_the_model(tiny):
    app = serve.create_app(*tiny, "fastvlm-tiny", timeout=1.0)
    with running(app) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as stalled:
            stalled.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            b"Content-Length: 1000\r\n\r\n{\"model\": ")
            r = client(url).chat.completions.create(model="fastvlm-tiny", temperature=0,
                                                    messages=[ask("What color is the circle?")])
            assert r.choices[0].message.content                # answered while the other stalls
            reply = b""
            while b"to arrive" not in reply and len(reply) < 100_000:
                more = stalled.recv(4096)
                if not more:
                    break
                reply += more
        assert reply.startswith(b"HTTP/1.1 408") and b"to arrive" in reply


# ----------------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,fragment", [
    (["--host", "0.0.0.0", "--model", "/no/such/model"], "--api-key"),    # (a model that fails fast)
    (["--port", "70000"], "--port must be at most 65,535"),
    (["--queue", "0"], "--queue must be at least 1"),
    (["--timeout", "0"], "--timeout"),
    (["--quantize", "int8", "--plain"], "--plain"),
])
def test_bad_options_are_one_line(capsys, argv, fragment):
    assert serve.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and fragment in err, err


def test_serve_prints_its_url_when_ready_and_answers():
    proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--port", "0", "--dtype", "float32"],
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        line = ""
        deadline = time.monotonic() + 120
        while "ready" not in line:
            assert time.monotonic() < deadline and proc.poll() is None, line
            line = proc.stderr.readline()
        url = line.split(" at ")[1].split(" ")[0]
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
        r = openai.OpenAI(base_url=url, api_key="none", max_retries=0).chat.completions.create(
            model="fastvlm-tiny", messages=[ask("What color is the circle?")], temperature=0)
        assert r.choices[0].message.content == "red"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_client_that_hangs_up_while_sending_frees_its_place(tiny):
    """With room for one request, ten clients that each send half a body and hang up leave the room free."""
    app = serve.create_app(*tiny, "fastvlm-tiny", queue=1)
    with running(app) as url:
        port = int(url.rsplit(":", 1)[1])
        for _ in range(10):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as gone:
                gone.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
            time.sleep(0.05)
        time.sleep(0.5)
        r = client(url).chat.completions.create(model="fastvlm-tiny", temperature=0,
                                                messages=[ask("What color is the circle?")])
        assert r.choices[0].message.content


def test_null_fields_mean_their_defaults(server, tiny):
    url, _ = server
    body = {"model": "fastvlm-tiny", "messages": [ask("What color is the circle?")], "temperature": 0, "top_p": None,
            "n": None, "stream": None, "max_completion_tokens": None, "max_tokens": 5, "stop": None, "seed": None}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == api_answer(tiny, "What color is the circle?")[0]


def test_a_refused_follow_up_keeps_its_conversation(server, tiny):
    """A follow-up refused for its length (max_tokens past the context) leaves the kept conversation as it
    was: the retry still prefills only its own turn."""
    url, app = server
    c, pool = client(url), app.state.pool
    a1 = c.chat.completions.create(model="fastvlm-tiny", messages=[ask("Is there a red square?")], temperature=0)
    follow = [ask("Is there a red square?"), {"role": "assistant", "content": a1.choices[0].message.content},
              {"role": "user", "content": "What color is the circle?"}]
    with pytest.raises(openai.BadRequestError, match="context"):
        c.chat.completions.create(model="fastvlm-tiny", messages=follow, temperature=0, max_tokens=5000)
    c.chat.completions.create(model="fastvlm-tiny", messages=follow, temperature=0)
    assert pool.last_prefill_tokens < 20


def test_a_huge_earlier_answer_is_refused_before_it_is_tokenized(server):
    url, _ = server
    messages = [ask("Describe the image."), {"role": "assistant", "content": "word " * 400_000},
                {"role": "user", "content": "And?"}]
    t = time.monotonic()
    r = httpx.post(url + "/v1/chat/completions", json={"model": "fastvlm-tiny", "messages": messages}, timeout=60)
    assert r.status_code == 400 and "conversation is 2,000,0" in r.json()["error"]["message"]
    assert time.monotonic() - t < 5
