"""A small gRPC client: `disagg generate --server HOST:PORT` and the benchmark use it."""
from __future__ import annotations

import json
import sys

import grpc

from engine.errors import DisaggError
from engine.sampling_params import SamplingParams
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc


def sampling_to_proto(sp: SamplingParams) -> pb.SamplingOptions:
    msg = pb.SamplingOptions(max_tokens=sp.max_tokens, temperature=sp.temperature, top_k=sp.top_k,
                             top_p=sp.top_p, stop=list(sp.stop), stop_token_ids=list(sp.stop_token_ids),
                             ignore_eos=sp.ignore_eos, presence_penalty=sp.presence_penalty,
                             frequency_penalty=sp.frequency_penalty, n=sp.n)
    for name, unset in (("seed", None), ("min_p", 0.0), ("repetition_penalty", 1.0), ("logprobs", None)):
        if getattr(sp, name) != unset:
            setattr(msg, name, getattr(sp, name))
    return msg


def make_request(prompt, sp: SamplingParams, request_id: str = "") -> pb.GenerateRequest:
    if isinstance(prompt, str):
        return pb.GenerateRequest(request_id=request_id, text=prompt, sampling=sampling_to_proto(sp))
    return pb.GenerateRequest(request_id=request_id, token_ids=pb.TokenIds(ids=list(prompt)),
                              sampling=sampling_to_proto(sp))


def channel(server: str, tls_ca: str | None = None, aio: bool = False):
    mod = grpc.aio if aio else grpc
    if tls_ca:
        with open(tls_ca, "rb") as f:
            return mod.secure_channel(server, grpc.ssl_channel_credentials(f.read()))
    return mod.insecure_channel(server)


def auth_metadata(token: str | None):
    return (("authorization", f"Bearer {token}"),) if token else None


def generate_remote(server: str, prompt, sp: SamplingParams, as_json: bool = False, token: str | None = None,
                    tls_ca: str | None = None, timeout_s: float | None = None) -> int:
    """Stream one generation to the terminal; errors become one line (exit code 2)."""
    ids, text, last = [], "", None
    with channel(server, tls_ca) as ch:
        stub = pb_grpc.InferenceStub(ch)
        try:
            for resp in stub.Generate(make_request(prompt, sp), timeout=timeout_s, metadata=auth_metadata(token)):
                ids += resp.token_ids
                text += resp.text
                if not as_json and resp.text:
                    print(resp.text, end="", flush=True)
                last = resp
        except grpc.RpcError as e:
            raise DisaggError(f"server {server}: {e.code().name}: {e.details()}") from None
    if as_json:
        print(json.dumps({"request_id": last.request_id, "token_ids": ids, "text": text,
                          "finish_reason": last.finish_reason,
                          "usage": {"prompt_tokens": last.usage.prompt_tokens, "completion_tokens": last.usage.completion_tokens,
                                    "cached_tokens": last.usage.cached_tokens},
                          "timings": {f.name: getattr(last.timings, f.name) for f in pb.Timings.DESCRIPTOR.fields}}))
    else:
        print(f"\n[finish_reason={last.finish_reason} tokens={len(ids)} ttft={last.timings.ttft_s * 1000:.1f} ms]",
              file=sys.stderr)
    return 0
