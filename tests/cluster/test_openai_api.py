"""The official `openai` client against a running `disagg serve` (subprocess, own local Ray):
chat and completions, streamed and not, equal to the in-process engine; usage counts; a client
that disconnects mid-stream frees its blocks on both pools; 400/401/404/413/429 are
OpenAI-shaped errors."""
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from engine.sampling_params import SamplingParams
from model.chat_template import render_chat
from model.llm import LLM
from model.tokenizer import load_tokenizer
from tests.model.tokenizer_layouts import make_llama3, stop_soon

openai = pytest.importorskip("openai")
TOKEN = "t0ken"
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hello, world!"}]
NAME = "acme/tiny-llama3-instruct"
ENV = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", DISAGG_AUTH_TOKEN=TOKEN,
           HF_HUB_OFFLINE="1")
ENV.pop("RAY_ADDRESS", None)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """8 decode blocks of 16 tokens and --max-pending 1: a 100-token prompt fills the decode
    pool, so its n=3 request is refused with 429; --max-prompt-tokens 200 -> a 1 MiB body limit."""
    d = tmp_path_factory.mktemp("openai")
    model = d / "model"
    make_llama3(model, tweak=stop_soon("llama3", model, CHAT))
    (d / "plan.json").write_text(json.dumps({"model": str(model), "prefill": {"num_kv_blocks": 64},
                                             "decode": {"num_kv_blocks": 8}}))
    ready = d / "ready.json"
    log = open(d / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "serve", "--plan", str(d / "plan.json"), "--port", "0",
                             "--http-port", "0", "--metrics-port", "0", "--max-pending", "1", "--max-prompt-tokens", "200",
                             "--served-model-name", NAME, "--ready-file", str(ready)],
                            env=ENV, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while not ready.is_file():
        assert proc.poll() is None and time.monotonic() < deadline, (d / "serve.log").read_text()
        time.sleep(0.2)
    info = json.loads(ready.read_text())
    yield {"http": info["http_port"], "metrics": info["metrics_port"], "model": model, "log": d / "serve.log"}
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def engine(server):
    return LLM(str(server["model"]))


def _client(server, key=TOKEN):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server['http']}/v1", api_key=key, max_retries=0, timeout=60)


def _metrics(server) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server['metrics']}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            k, _, v = line.rpartition(" ")
            out[k] = float(v)
    return out


def _wait_idle(server, timeout=20.0):
    """Every worker's KV usage 0 and nothing in flight (the serve process polls stats each second)."""
    deadline = time.monotonic() + timeout
    while True:
        m = _metrics(server)
        usage = {k: v for k, v in m.items() if k.startswith("disagg_kv_cache_usage_ratio")}
        if usage and not any(usage.values()) and m.get("disagg_requests_in_flight") == 0:
            return m
        assert time.monotonic() < deadline, f"blocks not freed: {usage}, in flight {m.get('disagg_requests_in_flight')}"
        time.sleep(0.3)


def test_models_and_health(server):
    models = _client(server).models.list()
    assert [m.id for m in models.data] == [NAME]
    with urllib.request.urlopen(f"http://127.0.0.1:{server['http']}/health", timeout=10) as r:
        body = json.loads(r.read())
    assert r.status == 200 and body["state"] == "serving" and body["roles"]["decode"] == 1


@pytest.mark.parametrize("prompt", ["the quick brown fox", [5, 6, 7, 8, 9]])
def test_completions_equal_in_process_engine(server, engine, prompt):
    c = _client(server)
    want = engine.generate([prompt], SamplingParams(max_tokens=10, ignore_eos=True))[0]
    kw = dict(model=NAME, prompt=prompt, max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    full = c.completions.create(**kw, logprobs=2)
    assert full.choices[0].text == want.text and full.choices[0].finish_reason == "length"
    tok = load_tokenizer(server["model"])
    assert full.choices[0].logprobs.tokens == [tok.decode([t], skip_special=False) for t in want.token_ids]
    assert all(1 <= len(t) <= 2 for t in full.choices[0].logprobs.top_logprobs)   # keyed by text: may collide
    n_prompt = len(engine.inputs.tokenize(prompt))
    assert (full.usage.prompt_tokens, full.usage.completion_tokens, full.usage.total_tokens) == (n_prompt, 10, n_prompt + 10)
    chunks = list(c.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == want.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"


def test_chat_equal_in_process_engine_and_stops_at_eot(server, engine):
    c = _client(server)
    tok = load_tokenizer(server["model"])
    prompt = tok.encode(render_chat(tok.chat_template, CHAT, tok.special_tokens), add_special_tokens=False)
    want = engine.generate([prompt], SamplingParams(max_tokens=20))[0]
    assert want.finish_reason == "stop" and len(want.token_ids) < 20       # <|eot_id|>, from generation_config.json
    r = c.chat.completions.create(model=NAME, messages=CHAT, max_completion_tokens=20, temperature=0)
    assert r.choices[0].message.content == want.text and r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.role == "assistant"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), len(want.token_ids))
    chunks = list(c.chat.completions.create(model=NAME, messages=CHAT, max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want.text
    assert chunks[-1].usage.completion_tokens == len(want.token_ids) and chunks[-1].usage.prompt_tokens == len(prompt)
    # Unset max_tokens: the room left in the context; n and seeds give reproducible choices.
    r2 = c.chat.completions.create(model=NAME, messages=CHAT, temperature=0.9, seed=3, n=2, logprobs=True, top_logprobs=2)
    r3 = c.chat.completions.create(model=NAME, messages=CHAT, temperature=0.9, seed=3, n=2, logprobs=True, top_logprobs=2)
    assert [ch.message.content for ch in r2.choices] == [ch.message.content for ch in r3.choices]
    assert all(len(x.top_logprobs) == 2 for ch in r2.choices for x in ch.logprobs.content)
    assert r2.usage.completion_tokens == sum(len(ch.logprobs.content) for ch in r2.choices)
    _wait_idle(server)


def test_disconnect_mid_stream_frees_blocks_on_both_pools(server):
    before = _metrics(server).get('disagg_requests_total{status="cancelled"}', 0)
    c = _client(server)
    with c.completions.create(model=NAME, prompt=[5] * 40, max_tokens=80, temperature=0, stream=True,
                              extra_body={"ignore_eos": True}) as stream:
        got = 0
        for ch in stream:
            got += bool(ch.choices and ch.choices[0].text)
            if got >= 2:
                break
    m = _wait_idle(server)
    assert m.get('disagg_requests_total{status="cancelled"}', 0) == before + 1


def test_disconnect_while_waiting_for_a_non_streamed_answer_frees_blocks(server):
    import socket
    before = _metrics(server).get('disagg_requests_total{status="cancelled"}', 0)
    body = json.dumps({"model": NAME, "prompt": [5] * 20, "max_tokens": 100, "temperature": 0,
                       "ignore_eos": True}).encode()
    with socket.create_connection(("127.0.0.1", server["http"])) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Authorization: Bearer {TOKEN}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        # The server admits the request as soon as it has read the body, before it watches for a
        # disconnect, so an early close is still a cancel. A long wait was a race: on a quiet
        # machine the 100 tokens were done within 0.2 s and the request finished instead.
        time.sleep(0.02)
    m = _wait_idle(server)
    assert m.get('disagg_requests_total{status="cancelled"}', 0) == before + 1


def _raw(server, body: bytes, key=TOKEN, path="/v1/completions"):
    req = urllib.request.Request(f"http://127.0.0.1:{server['http']}{path}", data=body, method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("kw,param", [
    ({"temperature": -1}, "temperature"), ({"max_tokens": 10**6}, "max_tokens"), ({"top_p": 2}, "top_p"),
    ({"n": 99}, "n"), ({"logit_bias": {"5": 1}}, "logit_bias"), ({"extra_body": {"stop_token_ids": [999]}}, "stop_token_ids"),
])
def test_400_names_the_field(server, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        _client(server).completions.create(model=NAME, prompt="hi", **kw)
    assert e.value.status_code == 400 and e.value.body["param"] == param and param in e.value.body["message"]


def test_401_404_413_429_shaped_right(server):
    with pytest.raises(openai.AuthenticationError) as e:
        _client(server, key="wrong").completions.create(model=NAME, prompt="hi", max_tokens=2)
    assert e.value.status_code == 401 and e.value.body["type"] == "authentication_error"
    with pytest.raises(openai.NotFoundError) as e:
        _client(server).completions.create(model="other", prompt="hi", max_tokens=2)
    assert e.value.body["param"] == "model"
    status, body = _raw(server, json.dumps({"model": NAME, "prompt": "x" * (2 << 20)}).encode())
    assert status == 413 and body["error"]["code"] == "request_too_large"
    status, body = _raw(server, b"{not json")
    assert status == 400 and body["error"]["param"] == "body"
    # 100 prompt tokens take 7 of the 8 decode blocks: choice 0 runs, 1 waits, 2 is over --max-pending.
    with pytest.raises(openai.RateLimitError) as e:
        _client(server).completions.create(model=NAME, prompt=list(range(3, 103)), max_tokens=20, n=3,
                                           extra_body={"ignore_eos": True})
    assert e.value.status_code == 429 and e.value.body["type"] == "rate_limit_error"
    _wait_idle(server)                      # the admitted choices were cancelled: nothing half done


def test_http_port_in_use_exits_2_before_ray_starts():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        t0 = time.monotonic()
        p = subprocess.run([sys.executable, "-m", "cluster.cli", "serve", "--model", "tiny-llama", "--port", "0",
                            "--metrics-port", "-1", "--http-port", str(port)], env=ENV, capture_output=True, text=True,
                           timeout=60)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and "in use" in lines[0], p.stderr
    assert time.monotonic() - t0 < 30
