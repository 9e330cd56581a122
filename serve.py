"""An OpenAI-compatible chat server for FastVLM: any program that speaks the OpenAI chat API (the `openai`
client, chat UIs, evaluation tools) can ask it about an image.

    pip install -r requirements-serve.txt
    python serve.py                                        # the embedded tiny model on 127.0.0.1:8000
    python serve.py --model checkpoints/FastVLM-0.5B --port 8000
    python serve.py --model checkpoints/FastVLM-0.5B --adapter runs/my-lora    # with LoRA adapters (train.py --lora)
    python serve.py --host 0.0.0.0 --api-key "$KEY"        # any other address needs a key

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    client.chat.completions.create(model="fastvlm-tiny", messages=[{"role": "user", "content": [
        {"type": "text", "text": "What color is the circle?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}]}])

Endpoints: POST /v1/chat/completions (streamed or not), GET /v1/models, and a page at / to try it in a
browser (support/page.html: drop an image, ask, see the time to first token split). One model answers one request at
a time; requests wait in a bounded queue (a full one answers 429 at once). A conversation whose earlier
turns the server has just answered continues in its kept KV cache and prefills only its new turn
(support/serving.py). Built on Starlette under uvicorn; the same loading and chat code as infer.py, so
the same question gets the same answer from both (greedy at temperature 0; the API's default
temperature is 1, so pass temperature=0 for infer.py's answer).
"""

import argparse
import asyncio
import hmac
import json
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from support.options import UsageError, check_counts, check_speed_options, infer_parser

MIB = 2**20
PAGE = Path(__file__).resolve().parent / "support" / "page.html"    # the page at /: ask, and see the time split


def build_parser():
    infer = infer_parser(__doc__)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for action in infer._actions:           # infer.py's model, device, dtype and speed options, as they are
        if action.dest in ("model", "adapter", "device", "dtype", "quantize", "plain"):
            p._add_action(action)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; anything but 127.0.0.1/localhost/::1 needs --api-key (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port, 1 to 65535; 0 picks a free one (default: %(default)s)")
    p.add_argument("--api-key", default=None, help="clients must send it as 'Authorization: Bearer KEY' (default: none)")
    p.add_argument("--name", default=None, help="the model name clients use (default: the model folder's name)")
    p.add_argument("--max-tokens", type=int, default=256, metavar="N",
                   help="answer length when a request does not say, 1 to 8192 (default: %(default)s)")
    p.add_argument("--queue", type=int, default=64, metavar="N",
                   help="requests waiting or answered at once, 1 to 10,000; more get 429 (default: %(default)s)")
    p.add_argument("--conversations", type=int, default=8, metavar="N",
                   help="conversations kept with their KV cache for follow-ups, 0 to 256; each holds a cache of "
                        "at least 1,024 positions: 12 MiB for FastVLM-0.5B in bfloat16, 25 MiB in float32 "
                        "(default: %(default)s)")
    p.add_argument("--max-body-mb", type=int, default=32, metavar="MB",
                   help="largest request body (JSON with a base64 image), 1 to 1024 (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=30.0, metavar="S",
                   help="seconds a client may take to send its request, 0.1 to 3600 (default: %(default)s)")
    return p


LOCAL = ("127.0.0.1", "localhost", "::1")


def check_serve_options(args):
    check_counts((("--port", args.port, 0, 65535, "the range of TCP ports"),
                  ("--max-tokens", args.max_tokens, 1, 8192, "FastVLM's context"),
                  ("--queue", args.queue, 1, 10_000, "each waiting request holds its image in memory"),
                  ("--conversations", args.conversations, 0, 256, "each holds a KV cache"),
                  ("--max-body-mb", args.max_body_mb, 1, 1024, "a body is held in memory whole")), UsageError)
    if not 0.1 <= args.timeout <= 3600:
        raise UsageError("--timeout must be from 0.1 to 3600 seconds")
    if args.host not in LOCAL and not args.api_key:
        raise UsageError(f"--host {args.host} lets other machines in: pass --api-key KEY too (or serve on 127.0.0.1)")
    check_speed_options(args)


def create_app(model, tokenizer, config, name, api_key=None, max_tokens=256, queue=64, conversations=8,
               max_body=32 * MIB, timeout=30.0):
    """The Starlette application: one model, one thread answering, a bounded queue in front of it."""
    from starlette.applications import Starlette
    from starlette.requests import ClientDisconnect
    from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    from support.serving import Cancelled, Conversations, RequestError, now, parse_request

    pool = Conversations(model, tokenizer, config, keep=conversations)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")    # the model's one thread
    state = {"admitted": 0}

    def error(e):
        return JSONResponse(e.body(), status_code=e.status)

    unauthorized = RequestError(401, "a valid API key is needed: send 'Authorization: Bearer KEY'")
    too_large = RequestError(413, f"the request body is over {max_body // MIB} MiB; send a smaller image")

    def authorized(request):
        if api_key is None:
            return True
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode())

    async def read_body(request):
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > max_body):
            raise too_large
        chunks, total = [], 0

        async def read():
            nonlocal total
            async for chunk in request.stream():
                total += len(chunk)
                if total > max_body:
                    raise too_large
                chunks.append(chunk)
        try:
            await asyncio.wait_for(read(), timeout)
        except asyncio.TimeoutError:
            raise RequestError(408, f"the request took over {timeout:g} s to arrive") from None
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, RecursionError) as e:
            raise RequestError(400, f"the request body is not valid JSON ({str(e)[:200]})") from None

    async def models(request):
        if not authorized(request):
            return error(unauthorized)
        return JSONResponse({"object": "list", "data": [{"id": name, "object": "model", "created": 0,
                                                         "owned_by": "fastvlm-from-scratch"}]})

    async def completions(request):
        if not authorized(request):
            return error(unauthorized)
        if state["admitted"] >= queue:
            return error(RequestError(429, f"the server is busy ({queue} requests waiting or being answered); "
                                           "retry in a moment"))
        state["admitted"] += 1
        released = False

        def release():
            nonlocal released
            if not released:
                released, state["admitted"] = True, state["admitted"] - 1

        try:
            body = await read_body(request)
            parsed = parse_request(body, name, max_tokens)
        except RequestError as e:
            release()
            return error(e)
        except ClientDisconnect:        # the client hung up while sending: its place in the queue is freed
            release()
            return Response(status_code=499)
        except BaseException:
            release()
            raise
        loop = asyncio.get_running_loop()
        events = asyncio.Queue()
        gone = {"flag": False}

        shown = {"text": ""}

        def on_text(text):              # only what is new: a client that reads slowly holds the answer once
            if len(text) > len(shown["text"]):
                delta, shown["text"] = text[len(shown["text"]):], text
                loop.call_soon_threadsafe(events.put_nowait, ("text", delta))

        def job():
            if gone["flag"]:
                return None
            try:
                result = pool.answer(parsed, on_text=on_text, cancelled=lambda: gone["flag"])
                loop.call_soon_threadsafe(events.put_nowait, ("done", result))
            except Cancelled:
                loop.call_soon_threadsafe(events.put_nowait, ("gone", None))
            except RequestError as e:
                loop.call_soon_threadsafe(events.put_nowait, ("error", e))
            except Exception as e:      # noqa: BLE001 - a server answers every request, whatever broke
                loop.call_soon_threadsafe(events.put_nowait, ("error", RequestError(500, f"{type(e).__name__}: {e}")))

        future = loop.run_in_executor(executor, job)
        future.add_done_callback(lambda _: release())
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", now()
        if not parsed.stream:
            watcher = asyncio.ensure_future(watch_disconnect(request, gone))
            try:
                while True:
                    kind, value = await events.get()
                    if kind == "text":
                        continue
                    if kind == "error":
                        return error(value)
                    if kind == "done":
                        return JSONResponse(completion(ident, created, name, value))
                    if kind == "gone":
                        return JSONResponse({}, status_code=499)
            finally:
                watcher.cancel()
                if not future.done():
                    gone["flag"] = True
        watcher = asyncio.ensure_future(watch_disconnect(request, gone))    # a client gone while it waits
        try:
            first = await events.get()               # an error before the first token is a plain error response
        finally:
            watcher.cancel()
        if first[0] == "error":
            return error(first[1])
        if first[0] == "gone":
            return Response(status_code=499)

        async def chunks():
            sent, event = "", first
            try:
                yield sse(chunk(ident, created, name, {"role": "assistant", "content": ""}))
                while True:
                    kind, value = event
                    if kind == "text":
                        yield sse(chunk(ident, created, name, {"content": value}))
                        sent += value
                    elif kind == "done":
                        if len(value.text) > len(sent):
                            yield sse(chunk(ident, created, name, {"content": value.text[len(sent):]}))
                        yield sse(chunk(ident, created, name, {}, value.finish_reason, timing=value.timing))
                        if parsed.include_usage:
                            yield sse({**chunk(ident, created, name, None), "choices": [], "usage": usage(value)})
                        yield "data: [DONE]\n\n"
                        return
                    elif kind in ("error", "gone"):
                        message = value.message if kind == "error" else "the answer was stopped"
                        yield sse({"error": {"message": message, "type": "server_error"}})
                        return
                    event = await events.get()
            finally:
                gone["flag"] = gone["flag"] or not future.done()      # the client left mid-stream: stop

        return StreamingResponse(chunks(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    page_html = PAGE.read_text(encoding="utf-8")

    async def page(request):
        return HTMLResponse(page_html)

    app = Starlette(routes=[Route("/", page), Route("/v1/models", models),
                            Route("/v1/chat/completions", completions, methods=["POST"])])
    app.state.pool, app.state.executor = pool, executor
    return app


async def watch_disconnect(request, gone):
    """Set gone["flag"] when the client hangs up while it waits: for a whole answer, or for a stream's first
    token (once a stream has begun, Starlette notices a hang-up itself)."""
    while not gone["flag"]:
        if await request.is_disconnected():
            gone["flag"] = True
            return
        await asyncio.sleep(0.2)


def sse(obj):
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def usage(result):
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def completion(ident, created, name, result):
    return {"id": ident, "object": "chat.completion", "created": created, "model": name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "finish_reason": result.finish_reason, "logprobs": None}],
            "usage": usage(result), "timing": result.timing}


def chunk(ident, created, name, delta, finish_reason=None, timing=None):
    body = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": name,
            "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                                                  "logprobs": None}]}
    if timing is not None:
        body["timing"] = timing
    return body


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        check_serve_options(args)
        try:
            import uvicorn
        except ImportError:
            raise UsageError("serve.py needs uvicorn and starlette: pip install -r requirements-serve.txt") from None
        from support.checkpoint import CheckpointError
        from support.options import DEFAULT_MODEL, load

        try:
            model, tokenizer, config, device = load(args)
        except CheckpointError as e:
            raise UsageError(str(e)) from None
        name = args.name or Path(str(args.model or DEFAULT_MODEL)).name
        app = create_app(model, tokenizer, config, name, args.api_key, args.max_tokens, args.queue,
                         args.conversations, args.max_body_mb * MIB, args.timeout)
        server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                               timeout_keep_alive=5))
        original = server.startup

        async def startup(sockets=None):
            await original(sockets)
            for s in server.servers:
                for sock in s.sockets:
                    host, port = sock.getsockname()[:2]
                    shown = f"[{host}]" if ":" in host else host
                    print(f"serving {name} ({model.precision.dtype}) at http://{shown}:{port}/v1 -- ready",
                          file=sys.stderr, flush=True)
        server.startup = startup
        server.run()
        return 0
    except UsageError as e:
        print("error: " + " ".join(str(e).splitlines()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
