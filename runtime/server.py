"""An OpenAI-compatible HTTP server over the continuous-batching Scheduler.

    GET  /v1/models, /health, /metrics (Prometheus text)
    POST /v1/completions       prompt as text or token ids; stream as server-sent events
    POST /v1/chat/completions  messages through the tokenizer's chat template

Starlette routes the requests, uvicorn serves them, pydantic checks the bodies
(runtime/protocol.py), prometheus_client keeps the metrics. The scheduler steps on its own
thread; each request's tokens come back to the event loop through an asyncio queue. A
client that disconnects cancels its request, which frees its slot at the next step.
Replies carry the generated ids as `token_ids` beside the text (also without a tokenizer).
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid

import anyio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .engine import GenerationError
from .protocol import (APIError, ChatRequest, CompletionRequest, StopStrings, ValidationError,
                       error_body, validation_message)
from .sampling import SamplingParams
from .scheduler import QueueFull, Request, Scheduler
from .tokenizer import TokenizerError

MAX_BODY_BYTES = 32 << 20
LATENCY_BUCKETS = (.001, .0025, .005, .01, .025, .05, .075, .1, .15, .2, .3, .5, .75, 1, 2.5, 5,
                   10, 20, 40, 80)


class Metrics:
    """The server's Prometheus metrics, in a registry of its own."""

    def __init__(self, max_batch: int):
        self.registry, self.max_batch = CollectorRegistry(), max_batch
        r, p = self.registry, "kimi_graph_"
        self.requests = Counter(p + "requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens", "prompt tokens admitted", registry=r)
        self.generation_tokens = Counter(p + "generation_tokens", "tokens generated", registry=r)
        self.cached_tokens = Counter(p + "prefix_cache_hit_tokens", "prompt tokens restored from the "
                                     "prefix cache instead of run", registry=r)
        self.queue_depth = Gauge(p + "queue_depth", "requests waiting for a cache slot", registry=r)
        self.running = Gauge(p + "running_requests", "requests holding a cache slot", registry=r)
        self.occupancy = Gauge(p + "batch_occupancy", "running requests / max batch", registry=r)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "from arrival to the first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram(p + "time_per_output_token_seconds",
                              "per request: (last token - first token) / (tokens - 1)",
                              buckets=LATENCY_BUCKETS, registry=r)

    def on_step(self, waiting: int, running: int) -> None:
        self.queue_depth.set(waiting)
        self.running.set(running)
        self.occupancy.set(running / self.max_batch)

    def on_finish(self, r: Request) -> None:
        self.generation_tokens.inc(len(r.output))
        self.cached_tokens.inc(r.cached)
        if r.t_first is not None:
            self.ttft.observe(r.t_first - r.t_submit)
        if len(r.output) > 1:
            self.tpot.observe((r.t_last - r.t_first) / (len(r.output) - 1))


class Generation:
    """One request's life on the event loop: submit, then text increments as tokens come."""

    def __init__(self, server: "OpenAIServer", ids: list[int], params: SamplingParams,
                 stop_strings: list[str]):
        loop = asyncio.get_running_loop()
        self.server, self.queue = server, asyncio.Queue()
        self.text = server.tokenizer.stream_decoder(skip_special=True) if server.tokenizer else None
        self.stops, self.tokens = StopStrings(stop_strings), []
        self.finish_reason: str | None = None
        self.prompt_tokens = len(ids)

        def sink(kind, value):
            loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))
        try:
            self.req = server.scheduler.submit(ids, params, sink)
        except QueueFull as e:
            raise APIError(429, str(e)) from None
        except (GenerationError, ValueError) as e:
            raise APIError(400, str(e)) from None
        server.metrics.prompt_tokens.inc(len(ids))

    async def pieces(self):
        """(text, new ids) increments, one per wake-up (the tokens that arrived meanwhile
        together); finish_reason is set when it ends."""
        try:
            while self.finish_reason is None:
                events = [await self.queue.get()]
                while not self.queue.empty():
                    events.append(self.queue.get_nowait())
                text, ids = "", []
                for kind, value in events:
                    if kind == "token":
                        ids.append(value)
                        piece = "" if value in self.req.stops or not self.text else self.text.push(value)
                        out, hit = self.stops.push(piece)
                        text += out
                        if hit:
                            self.finish_reason = "stop"
                    elif kind == "finish":
                        out, hit = self.stops.push(self.text.flush() if self.text else "")
                        text += out + ("" if hit else self.stops.flush())
                        self.finish_reason = value
                    elif kind == "error":
                        raise APIError(500, value)
                    else:
                        raise APIError(500, "the request was cancelled")
                    if self.finish_reason is not None:
                        break
                self.tokens += ids
                yield text, ids
        finally:
            self.cancel()

    def cancel(self) -> None:
        """Free the request's slot if it still runs (no-op once it has finished)."""
        self.server.scheduler.cancel(self.req)

    async def collect(self) -> str:
        try:
            return "".join([text async for text, _ in self.pieces()])
        finally:
            self.cancel()

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": len(self.tokens),
                "total_tokens": self.prompt_tokens + len(self.tokens),
                "prompt_tokens_details": {"cached_tokens": self.req.cached}}


class EventStream(StreamingResponse):
    """Server-sent events that stop, and close their source, as soon as the client leaves."""
    media_type = "text/event-stream"

    async def __call__(self, scope, receive, send):
        try:
            async with anyio.create_task_group() as tg:
                async def respond():
                    try:
                        await self.stream_response(send)
                    except OSError:
                        pass
                    tg.cancel_scope.cancel()
                tg.start_soon(respond)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            await self.body_iterator.aclose()


async def _unless_disconnected(request: HTTPRequest, coro):
    """`coro`'s result, or None (and `coro` cancelled) if the client disconnects first."""
    result, error = None, None
    async with anyio.create_task_group() as tg:
        async def run():
            nonlocal result, error
            try:
                result = await coro
            except Exception as e:      # noqa: BLE001 - re-raised below, not as a group
                error = e
            tg.cancel_scope.cancel()
        tg.start_soon(run)
        while (await request.receive())["type"] != "http.disconnect":
            pass
        tg.cancel_scope.cancel()
    if error is not None:
        raise error
    return result


async def _events(gen: Generation, chunk, include_usage: bool):
    try:
        async for text, ids in gen.pieces():
            if text or ids:
                yield sse(chunk(text, ids, None))
        yield sse({**chunk("", [], gen.finish_reason), "usage": gen.usage()})
        if include_usage:
            yield sse({**chunk("", [], None), "choices": [], "usage": gen.usage()})
    except APIError as e:
        yield sse(e.body())
    finally:
        gen.cancel()
    yield "data: [DONE]\n\n"


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class OpenAIServer:
    """The Starlette app for one model: `OpenAIServer(model, scheduler, name).app`."""

    def __init__(self, model, scheduler: Scheduler, name: str, api_key: str | None = None):
        self.model, self.scheduler, self.name, self.api_key = model, scheduler, name, api_key
        try:
            self.tokenizer = model.tokenizer
        except TokenizerError:
            self.tokenizer = None           # token ids in and out only
        self.chat_stops = []
        if self.tokenizer is not None:
            self.chat_stops = [i for i in (self.tokenizer.eos_id,
                                           self.tokenizer.special_tokens.get("<|im_end|>")) if i is not None]
        self.metrics = Metrics(scheduler.engine.cache.num_slots)
        scheduler.on_step, scheduler.on_finish = self.metrics.on_step, self.metrics.on_finish
        self.created = int(time.time())
        routes = [Route("/health", self.health), Route("/metrics", self.prometheus),
                  Route("/v1/models", self.models),
                  Route("/v1/completions", self.completions, methods=["POST"]),
                  Route("/v1/chat/completions", self.chat, methods=["POST"])]
        self.app = Starlette(routes=routes, lifespan=self._lifespan)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app):
        yield
        self.scheduler.stop()

    # -- plumbing ----------------------------------------------------------------------
    async def _handle(self, endpoint: str, request: HTTPRequest, fn) -> Response:
        """Run an endpoint: authentication, errors as OpenAI's JSON, the request counter."""
        try:
            if self.api_key is not None:
                got = request.headers.get("authorization", "")
                if not hmac.compare_digest(got.encode(), f"Bearer {self.api_key}".encode()):
                    raise APIError(401, "invalid or missing API key (Authorization: Bearer KEY)")
            response = await fn(request)
        except APIError as e:
            response = JSONResponse(e.body(), status_code=e.status)
        except ValidationError as e:
            msg, param = validation_message(e)
            response = JSONResponse(error_body(400, msg, param), status_code=400)
        except Exception as e:      # noqa: BLE001 - a reply, never a dead server
            response = JSONResponse(error_body(500, f"{type(e).__name__}: {e}"), status_code=500)
        self.metrics.requests.labels(endpoint, str(response.status_code)).inc()
        return response

    async def _body(self, request: HTTPRequest, schema):
        if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
            raise APIError(413, f"request body over {MAX_BODY_BYTES} bytes")
        raw = await request.body()
        try:
            if not isinstance(json.loads(raw), dict):
                raise APIError(400, "the body must be a JSON object")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not JSON: {e}") from None
        req = schema.model_validate_json(raw)       # strict: JSON types as OpenAI documents them
        if req.model != self.name:
            raise APIError(400, f"unknown model {req.model!r}; this server serves {self.name!r}",
                           "model", "model_not_found")
        return req

    def _encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise APIError(400, "this model has no tokenizer (tiktoken.model, tokenizer_config.json): "
                                "send the prompt as token ids", "prompt")
        return self.tokenizer.encode(text)

    async def _respond(self, request: HTTPRequest, gen: Generation, stream: bool, chunk, final,
                       include_usage: bool) -> Response:
        """Stream `chunk(text, ids, finish_reason)` events, or wait and return `final(text)`."""
        if stream:
            return EventStream(_events(gen, chunk, include_usage))
        text = await _unless_disconnected(request, gen.collect())
        if text is None:            # the client left; its request is cancelled
            return Response(status_code=499)
        return JSONResponse(final(text))

    # -- endpoints ------------------------------------------------------------------------
    async def health(self, request):
        return JSONResponse({"status": "ok"})

    async def prometheus(self, request):
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def models(self, request):
        async def fn(_):
            return JSONResponse({"object": "list", "data": [
                {"id": self.name, "object": "model", "created": self.created, "owned_by": "kimi-graph",
                 "max_model_len": self.scheduler.max_len}]})
        return await self._handle("models", request, fn)

    async def completions(self, request):
        async def fn(request):
            req = await self._body(request, CompletionRequest)
            prompt = req.single_prompt
            ids = self._encode(prompt) if isinstance(prompt, str) else prompt
            gen = Generation(self, ids, req.sampling(req.max_tokens or 16), req.stop_strings)
            rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

            def chunk(text, ids, finish):
                return {"id": rid, "object": "text_completion", "created": created, "model": self.name,
                        "choices": [{"index": 0, "text": text, "token_ids": ids, "logprobs": None,
                                     "finish_reason": finish}]}

            def final(text):
                body = chunk(text, gen.tokens, gen.finish_reason)
                return {**body, "usage": gen.usage()}
            return await self._respond(request, gen, req.stream, chunk, final, _usage_chunk(req))
        return await self._handle("completions", request, fn)

    async def chat(self, request):
        async def fn(request):
            req = await self._body(request, ChatRequest)
            if self.tokenizer is None or not self.tokenizer.chat_template:
                raise APIError(400, "this model has no chat template; use /v1/completions")
            try:
                ids = self.tokenizer.apply_chat_template([m.as_template_message() for m in req.messages])
            except TokenizerError as e:
                raise APIError(400, str(e), "messages") from None
            limit = req.token_limit or max(self.scheduler.max_len - len(ids), 1)
            gen = Generation(self, ids, req.sampling(limit, self.chat_stops), req.stop_strings)
            rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
            started = []

            def chunk(text, ids, finish):
                delta = {"content": text} if text or ids else {}
                if not started:
                    started.append(True)
                    delta = {"role": "assistant", **delta, "content": text}
                return {"id": rid, "object": "chat.completion.chunk", "created": created,
                        "model": self.name, "choices": [{"index": 0, "delta": delta, "token_ids": ids,
                                                         "logprobs": None, "finish_reason": finish}]}

            def final(text):
                return {"id": rid, "object": "chat.completion", "created": created, "model": self.name,
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                     "token_ids": gen.tokens, "logprobs": None,
                                     "finish_reason": gen.finish_reason}],
                        "usage": gen.usage()}
            return await self._respond(request, gen, req.stream, chunk, final, _usage_chunk(req))
        return await self._handle("chat", request, fn)


def _usage_chunk(req) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)


# -- running it -------------------------------------------------------------------------------
def build_scheduler(model, *, max_batch: int = 8, max_len: int = 4096, max_queue: int = 256,
                    prefill_chunk: int = 256, step_tokens: int | None = None,
                    page_size: int | None = None, prefix_cache_bytes: int = 0,
                    cuda_graphs: bool = False, scheduler_class: type = Scheduler) -> Scheduler:
    """An engine of `max_batch` slots of `max_len` tokens and its scheduler (not started).
    `scheduler_class`: runtime.replicated's for the ranks of a sharded model."""
    from .engine import Engine
    max_len = min(max_len, model.config.model_max_length)
    engine = Engine(model, max_batch, max_len, page_size=page_size, cuda_graphs=cuda_graphs)
    return scheduler_class(engine, prefill_chunk=prefill_chunk, step_tokens=step_tokens,
                           max_queue=max_queue, prefix_cache_bytes=prefix_cache_bytes)


def build_server(model, *, name: str, api_key: str | None = None, **options) -> OpenAIServer:
    """The app over build_scheduler(model, **options), its scheduler started."""
    scheduler = build_scheduler(model, **options)
    server = OpenAIServer(model, scheduler, name, api_key)
    scheduler.start()
    return server


def run(server: OpenAIServer, host: str = "127.0.0.1", port: int = 8000, sock=None,
        log_level: str = "info") -> None:
    """Serve until interrupted (uvicorn); `sock`: an already bound socket instead of host:port."""
    import uvicorn
    config = uvicorn.Config(server.app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=5)
    uv = uvicorn.Server(config)
    try:
        uv.run(sockets=[sock] if sock is not None else None)
    finally:
        server.scheduler.stop()
