"""The OpenAI-compatible server, live on a free port, driven by the official `openai` client:
completions and chat, streamed and not; concurrent streams equal the same requests run one
by one; a client that leaves frees its slot; bad requests get OpenAI-shaped errors and the
server keeps serving. The model is a 2-layer checkpoint (one KDA, one MLA) with the test
tokenizer of test_tokenizer.py."""
from __future__ import annotations

import asyncio
import random
import socket
import threading
import time

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import kimi_graph                                            # noqa: E402
from checkpoints import random_config                        # noqa: E402
from kimi_graph.runtime.server import build_server           # noqa: E402
from test_tokenizer import BASE, VOCAB, write_tokenizer      # noqa: E402

NAME, KEY, MAX_BATCH = "tiny-chat", "sk-test", 8


@pytest.fixture(scope="module")
def model_dir(make_checkpoint):
    cfg = random_config(3, vocab_size=VOCAB, eos_token_id=BASE + 1, bos_token_id=BASE,
                        num_hidden_layers=2, first_k_dense_replace=1, num_experts=4,
                        num_experts_per_token=2, num_expert_group=1, topk_group=1,
                        linear_attn_config={"kda_layers": [1], "full_attn_layers": [2],
                                            "num_heads": 2, "head_dim": 8, "short_conv_kernel_size": 4})
    return write_tokenizer(make_checkpoint(cfg, seed=3))


class Live:
    """A server on a thread, bound to a free port."""

    def __init__(self, model, **options):
        import uvicorn
        self.server = build_server(model, name=NAME, **options)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.uv = uvicorn.Server(uvicorn.Config(self.server.app, log_level="warning"))
        self.thread = threading.Thread(target=self.uv.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        while not self.uv.started:
            time.sleep(0.01)

    @property
    def scheduler(self):
        return self.server.scheduler

    def client(self, key=KEY, **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, **kw)

    def close(self):
        self.uv.should_exit = True
        self.thread.join()
        self.server.scheduler.stop()


@pytest.fixture(scope="module")
def live(model_dir):
    s = Live(kimi_graph.load(model_dir), max_batch=MAX_BATCH, max_len=64, api_key=KEY,
             prefill_chunk=4, step_tokens=12, max_queue=80, prefix_cache_bytes=1 << 20)
    yield s
    s.close()


def wait_idle(live, timeout=30):
    end = time.time() + timeout
    while not live.scheduler.idle or live.scheduler.engine.cache.free_slots != MAX_BATCH:
        assert time.time() < end, "the scheduler did not go idle"
        time.sleep(0.02)


def test_models_health_metrics(live):
    client = live.client()
    assert [m.id for m in client.models.list().data] == [NAME]
    assert httpx.get(live.url + "/health").json() == {"status": "ok"}
    text = httpx.get(live.url + "/metrics").text
    for name in ("kimi_graph_requests_total", "kimi_graph_prompt_tokens_total",
                 "kimi_graph_generation_tokens_total", "kimi_graph_queue_depth",
                 "kimi_graph_batch_occupancy", "kimi_graph_time_to_first_token_seconds_bucket",
                 "kimi_graph_time_per_output_token_seconds_bucket"):
        assert name in text


def test_completions_text_ids_and_stream(live, model_dir):
    client = live.client()
    tok = live.server.tokenizer
    r = client.completions.create(model=NAME, prompt="hello world", max_tokens=6, temperature=0,
                                  extra_body={"ignore_eos": True})
    ids = r.choices[0].model_extra["token_ids"]
    assert len(ids) == 6 and r.choices[0].finish_reason == "length"
    assert r.choices[0].text == tok.decode(ids, skip_special=True)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(tok.encode("hello world")), 6)
    # the same request as token ids, and streamed: same tokens, same text
    r2 = client.completions.create(model=NAME, prompt=tok.encode("hello world"), max_tokens=6,
                                   temperature=0, extra_body={"ignore_eos": True})
    assert r2.choices[0].model_extra["token_ids"] == ids
    assert r2.usage.prompt_tokens_details.cached_tokens == (len(tok.encode("hello world")) - 1) // 4 * 4
    chunks = list(client.completions.create(model=NAME, prompt="hello world", max_tokens=6,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert sum((c.choices[0].model_extra["token_ids"] for c in chunks if c.choices), []) == ids
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    # the model greedy-generated the reference; sampled with a seed twice: the same
    kw = dict(model=NAME, prompt=[5, 6, 7], max_tokens=8, temperature=0.9, top_p=0.9, seed=11,
              extra_body={"top_k": 20, "ignore_eos": True})
    a, b = (client.completions.create(**kw).choices[0].model_extra["token_ids"] for _ in range(2))
    assert a == b
    want = kimi_graph.load(model_dir).generate([[5, 6, 7]], max_new_tokens=8, temperature=0.9,
                                               top_p=0.9, top_k=20, seed=11, ignore_eos=True)[0]
    assert a == want


def test_stops(live):
    client = live.client()
    tok = live.server.tokenizer
    base = client.completions.create(model=NAME, prompt=[9, 8, 7], max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0]
    ids = base.model_extra["token_ids"]
    # a stop token id: generation ends at it (kept in token_ids, not in the text)
    r = client.completions.create(model=NAME, prompt=[9, 8, 7], max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True, "stop_token_ids": [ids[3]]}).choices[0]
    first = ids.index(ids[3])
    assert r.model_extra["token_ids"] == ids[:first + 1] and r.finish_reason == "stop"
    assert r.text == tok.decode(ids[:first], skip_special=True)
    # a stop string: the text ends before it, streamed or not
    text = base.text
    stop = text[len(text) // 2:len(text) // 2 + 2] if len(text) > 3 else None
    if stop:
        for stream in (False, True):
            out = client.completions.create(model=NAME, prompt=[9, 8, 7], max_tokens=12, temperature=0,
                                            stop=[stop], stream=stream, extra_body={"ignore_eos": True})
            got = "".join(c.choices[0].text for c in out) if stream else out.choices[0].text
            assert got == text[:text.index(stop)]
    wait_idle(live)


def test_chat(live):
    client = live.client()
    tok = live.server.tokenizer
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello 你好"}]
    r = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=5, temperature=0)
    c = r.choices[0]
    ids = c.model_extra["token_ids"]
    assert c.message.role == "assistant" and 1 <= len(ids) <= 5
    assert r.usage.prompt_tokens == len(tok.apply_chat_template(msgs))
    stream = list(client.chat.completions.create(model=NAME, messages=msgs, max_tokens=5,
                                                 temperature=0, stream=True))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(s.choices[0].delta.content or "" for s in stream) == c.message.content
    assert stream[-1].choices[0].finish_reason == c.finish_reason


def test_concurrent_streams_equal_one_by_one(live):
    """64 streaming requests of mixed prompt and output lengths at once, through 8 slots and
    4-token prefill chunks; greedy outputs equal each request run alone. The concurrent run
    finds the prompts' prefixes in the prefix cache (saved by the runs alone)."""
    rng = random.Random(0)
    reqs = [([rng.randrange(VOCAB) for _ in range(rng.randint(1, 10))], rng.randint(1, 5))
            for _ in range(64)]
    client = live.client()
    alone = [client.completions.create(model=NAME, prompt=p, max_tokens=n, temperature=0,
                                       extra_body={"ignore_eos": True}).choices[0].model_extra["token_ids"]
             for p, n in reqs]

    async def one(aclient, p, n):
        ids = []
        async for c in await aclient.completions.create(model=NAME, prompt=p, max_tokens=n,
                                                        temperature=0, stream=True,
                                                        extra_body={"ignore_eos": True}):
            if c.choices:
                ids += c.choices[0].model_extra["token_ids"]
        return ids

    async def all_at_once():
        aclient = openai.AsyncOpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0)
        async with aclient:
            return await asyncio.gather(*(one(aclient, p, n) for p, n in reqs))
    cached = metrics(live).get("kimi_graph_prefix_cache_hit_tokens_total", 0)
    assert asyncio.run(all_at_once()) == alone
    wait_idle(live)
    hits = metrics(live)["kimi_graph_prefix_cache_hit_tokens_total"] - cached
    assert hits == sum((len(p) - 1) // 4 * 4 for p, _ in reqs)
    wait_idle(live)


def test_disconnect_frees_the_slot(live):
    with httpx.stream("POST", live.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": NAME, "prompt": [1, 2, 3], "max_tokens": 60, "temperature": 0,
                            "stream": True, "ignore_eos": True}) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        assert live.scheduler.engine.cache.free_slots == MAX_BATCH - 1
    wait_idle(live, timeout=10)     # long before 60 tokens could have been generated
    # not streamed: the client gives up waiting. Each step is slowed to 50 ms so that 60 tokens
    # take 3 s, well past the client's 0.5 s, however fast the machine.
    engine = live.scheduler.engine
    decode_sample = engine.decode_sample

    def slow_decode_sample(*args, **kwargs):
        time.sleep(0.05)
        return decode_sample(*args, **kwargs)
    engine.decode_sample = slow_decode_sample
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(live.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=0.5,
                       json={"model": NAME, "prompt": [1, 2, 3], "max_tokens": 60, "ignore_eos": True})
        wait_idle(live, timeout=2.5)    # freed before the 60 tokens (3 s) could have been generated
    finally:
        del engine.decode_sample
    wait_idle(live, timeout=10)


@pytest.mark.parametrize("body,status,match", [
    ({"model": "nope", "prompt": "hi"}, 400, "unknown model"),
    ({"model": NAME, "prompt": "hi", "temperature": -1}, 400, "temperature"),
    ({"model": NAME, "prompt": "hi", "n": 2}, 400, "n=2"),
    ({"model": NAME, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": NAME, "prompt": "hi", "frobnicate": 1}, 400, "frobnicate"),
    ({"model": NAME, "prompt": [1, VOCAB]}, 400, "out of range"),
    ({"model": NAME, "prompt": []}, 400, "empty"),
    ({"model": NAME, "prompt": ["a", "b"]}, 400, "one prompt"),
    ({"model": NAME, "prompt": [1] * 60, "max_tokens": 5}, 400, "context of 64"),
    ({"model": NAME, "prompt": "hi", "stop": [""]}, 400, "stop"),
    ({"model": NAME, "prompt": "hi", "stop_token_ids": [-1]}, 400, "stop_ids"),
    ({"model": NAME, "prompt": "hi", "stop_token_ids": [VOCAB]}, 400, "outside the vocabulary"),
    ({"model": NAME}, 400, "prompt"),
])
def test_bad_requests_get_400(live, body, status, match):
    r = httpx.post(live.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert match in err["message"] and err["type"] == "invalid_request_error"


def test_errors_and_the_server_keeps_serving(live):
    h = {"Authorization": f"Bearer {KEY}"}
    assert httpx.post(live.url + "/v1/completions", content=b"{not json", headers=h).status_code == 400
    assert httpx.post(live.url + "/v1/completions", content=b"[1]", headers=h).status_code == 400
    assert httpx.post(live.url + "/v1/chat/completions", headers=h,
                      json={"model": NAME, "messages": [{"role": "tool", "content": "x"}]}).status_code == 400
    with pytest.raises(openai.AuthenticationError):
        live.client(key="wrong").completions.create(model=NAME, prompt="hi", max_tokens=1)
    with pytest.raises(openai.BadRequestError):
        live.client().completions.create(model="other", prompt="hi", max_tokens=1)
    r = live.client().completions.create(model=NAME, prompt="hi", max_tokens=2, temperature=0)
    assert r.usage.completion_tokens >= 1
    # extreme but valid values run: a temperature under 1e-5 is greedy, a 64-bit seed is a seed
    tiny_t = live.client().completions.create(model=NAME, prompt="hi", max_tokens=2, temperature=1e-30,
                                              seed=(1 << 64) - 1, extra_body={"top_k": 10 ** 6})
    assert tiny_t.choices[0].model_extra["token_ids"] == r.choices[0].model_extra["token_ids"]
    wait_idle(live)


def metrics(live) -> dict[str, float]:
    text = httpx.get(live.url + "/metrics").text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def test_metrics_count(live):
    ok, bad = ('kimi_graph_requests_total{endpoint="completions",status="%d"}' % c for c in (200, 400))
    before = metrics(live)
    live.client().completions.create(model=NAME, prompt=[4, 5, 6], max_tokens=3, temperature=0,
                                     extra_body={"ignore_eos": True})
    httpx.post(live.url + "/v1/completions", json={"model": NAME, "prompt": []},
               headers={"Authorization": f"Bearer {KEY}"})
    wait_idle(live)
    after = metrics(live)
    for name, n in ((ok, 1), (bad, 1), ("kimi_graph_prompt_tokens_total", 3),
                    ("kimi_graph_generation_tokens_total", 3),
                    ("kimi_graph_time_to_first_token_seconds_count", 1),
                    ("kimi_graph_time_per_output_token_seconds_count", 1)):
        assert after[name] - before.get(name, 0) == n, name
    assert after["kimi_graph_queue_depth"] == 0 and after["kimi_graph_batch_occupancy"] == 0


def test_queue_full_is_429(model_dir):
    s = Live(kimi_graph.load(model_dir), max_batch=1, max_len=64, max_queue=1)
    try:
        s.scheduler.stop()          # nothing runs: requests stay queued
        body = {"model": NAME, "prompt": [1, 2], "max_tokens": 1}

        def wait_forever():
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(s.url + "/v1/completions", json=body, timeout=0.5)
        first = threading.Thread(target=wait_forever, daemon=True)
        first.start()
        end = time.time() + 5
        while len(s.scheduler._inbox) + len(s.scheduler.waiting) < 1 and time.time() < end:
            time.sleep(0.01)
        r = httpx.post(s.url + "/v1/completions", json=body)
        first.join()
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
    finally:
        s.close()


def test_cli(model_dir, monkeypatch, capsys):
    from kimi_graph.cli import main as cli_main
    import kimi_graph.runtime.server as server_mod
    seen = {}
    monkeypatch.setattr(server_mod, "run", lambda server, host, port, **kw: seen.update(
        server=server, host=host, port=port))
    assert cli_main(["serve", str(model_dir), "--max-batch", "3", "--max-len", "40", "--api-key", "k",
                     "--prefill-chunk", "8", "--port", "8123"]) == 0
    server = seen["server"]
    server.scheduler.stop()
    assert (seen["host"], seen["port"], server.name, server.api_key) == ("127.0.0.1", 8123, str(model_dir), "k")
    assert server.scheduler.engine.cache.num_slots == 3 and server.scheduler.max_len == 40
    assert server.scheduler.prefill_chunk == 8 and server.tokenizer is not None
    assert cli_main(["serve", str(model_dir), "--experts", "int4"]) == 2
    assert "--experts 'int4' is not supported" in capsys.readouterr().err
    assert cli_main(["serve", str(model_dir), "--max-batch", "0"]) == 2
