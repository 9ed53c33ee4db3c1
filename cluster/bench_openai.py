"""`disagg bench --backend openai --base-url URL`: the same workloads and report against any
OpenAI-compatible server (our HTTP front, vLLM, SGLang), through the official `openai` client.

Requests go to /v1/completions with the workload's prompt as token ids (exact prompt lengths
on any server), temperature 0, `ignore_eos` and the run's seed, streamed with
stream_options.include_usage. Times are taken on receipt of each chunk that delivers tokens (one
with text, or any before the finish: servers that send a chunk per token while its text is held
back, as ours does, are timed per token as over gRPC): TTFT at the first, inter-token gaps
between them; the output token count is the server's usage.completion_tokens."""
from __future__ import annotations

import time
import uuid
from types import SimpleNamespace

from cluster.bench import Record, build_workload, drive, plan_requests
from engine.errors import ConfigError, DisaggError


def _client(args):
    try:
        import openai
    except ImportError:
        raise ConfigError("--backend openai needs the openai package: pip install 'disagg-serve[bench]'") from None
    if not args.base_url:
        raise ConfigError("--backend openai needs --base-url, e.g. http://127.0.0.1:8000/v1")
    return openai, openai.AsyncOpenAI(base_url=args.base_url, api_key=args.token or "EMPTY", max_retries=0,
                                      timeout=args.request_timeout_s or 600.0)


async def fetch_info(openai, client, args):
    """The server's model and limits from /v1/models (vLLM and our front report max_model_len)."""
    try:
        models = await client.models.list(timeout=args.connect_timeout_s)
    except openai.APIError as e:
        raise DisaggError(f"server {args.base_url}: {e} (is an OpenAI-compatible server running there?)") from None
    data = [m.model_dump() for m in models.data]
    if not data:
        raise DisaggError(f"server {args.base_url} lists no model")
    m = next((d for d in data if d["id"] == args.model), None) if args.model else data[0]
    if m is None:
        raise ConfigError(f"--model {args.model!r} is not served at {args.base_url}: {[d['id'] for d in data]}")
    vocab = args.vocab_size or m.get("vocab_size") or 0
    if not vocab:
        raise ConfigError(f"{args.base_url} does not report the vocabulary size; pass --vocab-size")
    max_len = m.get("max_model_len") or 0
    if not max_len:
        raise ConfigError(f"{args.base_url} does not report max_model_len; pass --max-prompt-len and --max-output-len")
    return SimpleNamespace(model=m["id"], max_model_len=int(max_len), vocab_size=int(vocab),
                           max_prompt_tokens=int(m.get("max_prompt_tokens") or 0),
                           max_tokens_limit=int(m.get("max_tokens_limit") or 0))


async def _one(openai, client, rec: Record, body: dict, t0: float):
    rec.sent_s = time.perf_counter() - t0
    chunks = 0
    try:
        stream = await client.completions.create(**body)
        async for ch in stream:
            now = time.perf_counter() - t0
            if ch.usage is not None:
                rec.num_tokens = ch.usage.completion_tokens
            if not ch.choices:
                continue
            c = ch.choices[0]
            if c.text or not c.finish_reason:
                if chunks:
                    rec.itl_s.append(now - rec.last_token_s)
                else:
                    rec.first_token_s = now
                rec.last_token_s = now
                chunks += 1
                rec.num_messages += 1
            if c.finish_reason:
                rec.finish_reason = c.finish_reason
        rec.done_s = time.perf_counter() - t0
        rec.status = "OK"
        if not rec.num_tokens:           # a server that ignores include_usage
            rec.num_tokens = chunks
    except openai.APIStatusError as e:
        rec.status, rec.error = f"HTTP_{e.status_code}", str(e)[:200]
    except Exception as e:  # noqa: BLE001 - a client-side failure is counted, never fatal
        rec.status, rec.error = "CLIENT_ERROR", f"{type(e).__name__}: {e}"[:200]


async def replay_openai(args):
    openai, client = _client(args)
    wl = build_workload(args)
    async with client:
        info = await fetch_info(openai, client, args)
        recs, ids, outputs, notes = plan_requests(wl, info, args)
        run_id = uuid.uuid4().hex[:8]

        def body(prompt, max_tokens, user=""):
            return {"model": info.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                    "seed": args.seed, "stream": True, "stream_options": {"include_usage": True},
                    "extra_body": {"ignore_eos": True}, "user": user}
        for _ in range(args.num_warmups):
            await _one(openai, client, Record(-1, 8, 4, 0.0), body(list(range(8)), 4), time.perf_counter())
        msgs = [body(p, o, f"bench-{run_id}-{i}") for i, (p, o) in enumerate(zip(ids, outputs))]
        await drive(recs, msgs, lambda rec, msg, t0: _one(openai, client, rec, msg, t0), args.max_concurrency, notes)
    return recs, wl, info, notes
