"""Prometheus metrics, prefix `disagg_`, on their own registry.

Request-level series are fed by the controller as tokens arrive; per-worker gauges (queue
lengths, KV cache usage) are refreshed from the workers' stats by a poller.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LAT = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_ITL = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.5, 5)
STAGES = ("prefill_queue", "prefill_compute", "kv_transfer", "decode_queue")
ROLES = ("prefill", "decode", "colocated")


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("disagg_ttft_seconds", "Time to first token", buckets=_LAT, registry=r)
        self.itl = Histogram("disagg_inter_token_latency_seconds", "Time between streamed token deliveries, per token",
                             buckets=_ITL, registry=r)
        self.e2e = Histogram("disagg_e2e_latency_seconds", "Request latency from arrival to its last token",
                             buckets=_LAT, registry=r)
        self.stage = Histogram("disagg_ttft_breakdown_seconds",
                               "Request stages: prefill queue and compute (which make the TTFT), then KV transfer "
                               "and decode queue (before the second token)", ["stage"], buckets=_LAT, registry=r)
        self.kv_bytes = Counter("disagg_kv_transfer_bytes", "KV cache bytes moved prefill -> decode",
                                ["src", "dst"], registry=r)
        self.kv_seconds = Histogram("disagg_kv_transfer_seconds", "KV transfer time per request",
                                    ["src", "dst"], buckets=_ITL, registry=r)
        self.requests = Counter("disagg_requests", "Requests by final status", ["status"], registry=r)
        self.prompt_tokens = Counter("disagg_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generated_tokens = Counter("disagg_generated_tokens", "Generated tokens", registry=r)
        self.queue = Gauge("disagg_queue_length", "Requests per worker queue", ["instance", "queue"], registry=r)
        self.kv_usage = Gauge("disagg_kv_cache_usage_ratio", "Used / total KV blocks per worker", ["instance"], registry=r)
        self.kv_blocks = Gauge("disagg_kv_cache_free_blocks", "Free KV blocks per worker", ["instance"], registry=r)
        self.decode_batch = Gauge("disagg_decode_batch_size", "Requests in the last decode step", ["instance"], registry=r)
        self.pending = Gauge("disagg_controller_pending_requests", "Requests waiting for decode capacity", registry=r)
        self.in_flight = Gauge("disagg_requests_in_flight", "Requests accepted and not finished", registry=r)
        self.prefix_hit_tokens = Counter("disagg_prefix_hit_tokens", "Prompt tokens served by a prefill or colocated "
                                         "instance's prefix cache", ["instance"], registry=r)
        self.prefix_prompt_tokens = Counter("disagg_prefix_prompt_tokens", "Prompt tokens prefilled per prefill or colocated "
                                            "instance (hit or computed)", ["instance"], registry=r)
        self.prefix_hit_rate = Gauge("disagg_prefix_hit_rate", "Prefix cache hit rate per prefill or colocated instance since "
                                     "start: hit tokens / prompt tokens", ["instance"], registry=r)
        self._prefix: dict[str, list[int]] = {}
        self.retries = Gauge("disagg_controller_retries", "Requests recomputed after a failure (total)", registry=r)
        self.instance_role = Gauge("disagg_instance_role", "1 for the role each instance serves now, 0 for the others",
                                   ["instance", "role"], registry=r)
        self.role_changes = Counter("disagg_role_changes", "Role changes of instances while serving",
                                    ["from_role", "to_role"], registry=r)
        self.role_change_seconds = Histogram("disagg_role_change_seconds", "Duration of a role change (drain + switch)",
                                             buckets=_LAT, registry=r)

    # Hooks called by the controller -------------------------------------------------------
    def on_submit(self, t) -> None:
        self.in_flight.inc()

    def on_rejected(self, t) -> None:
        """Accepted by validation, refused for lack of capacity (RESOURCE_EXHAUSTED)."""
        self.in_flight.dec()
        self.requests.labels("rejected").inc()

    def on_tokens(self, t, n: int, first: bool, now: float) -> None:
        self.generated_tokens.inc(n)
        if first:
            self.ttft.observe(now - t.times["arrival"])
        else:
            gap = now - t.times.get("prev_token", now)
            for _ in range(n):
                self.itl.observe(gap / n)
            if "decode_queue_s" not in t.durations and "transfer_end" in t.times:
                t.durations["decode_queue_s"] = now - t.times["transfer_end"]
        t.times["prev_token"] = now

    def on_prefilled(self, instance: str, num_tokens: int, num_cached_tokens: int) -> None:
        """A prefill or colocated instance prefilled `num_tokens` prompt tokens, `num_cached_tokens` of them
        from its prefix cache."""
        self.prefix_hit_tokens.labels(instance).inc(num_cached_tokens)
        self.prefix_prompt_tokens.labels(instance).inc(num_tokens)
        c = self._prefix.setdefault(instance, [0, 0])
        c[0] += num_cached_tokens
        c[1] += num_tokens
        self.prefix_hit_rate.labels(instance).set(c[0] / c[1] if c[1] else 0.0)

    def on_transfer(self, src: str, dst: str, nbytes: int, seconds: float) -> None:
        self.kv_bytes.labels(src, dst).inc(nbytes)
        self.kv_seconds.labels(src, dst).observe(seconds)

    def on_decode_step(self, instance: str, batch_size: int) -> None:
        self.decode_batch.labels(instance).set(batch_size)

    def on_finish(self, t, reason: str) -> None:
        self.in_flight.dec()
        self.requests.labels(reason).inc()
        self.prompt_tokens.inc(t.req.num_prompt_tokens)
        if "finish" in t.times:
            self.e2e.observe(t.times["finish"] - t.times["arrival"])
        for stage in STAGES:
            v = t.durations.get(f"{stage}_s")
            if v is not None:
                self.stage.labels(stage).observe(v)

    def set_role(self, instance: str, role: str) -> None:
        for r in ROLES:
            self.instance_role.labels(instance, r).set(1 if r == role else 0)

    def on_role_change(self, instance: str, old: str, role: str, seconds: float) -> None:
        self.set_role(instance, role)
        self.role_changes.labels(old, role).inc()
        self.role_change_seconds.observe(seconds)

    def update_from_stats(self, stats: dict) -> None:
        for name, w in stats.get("workers", {}).items():
            if w.get("role") in ROLES:
                self.set_role(name, w["role"])
            if "error" in w:
                continue
            for q in ("num_waiting", "num_running", "num_held", "num_reserved"):
                if q in w:
                    self.queue.labels(name, q[4:]).set(w[q])
            if w.get("num_blocks"):
                self.kv_usage.labels(name).set(w["used_blocks"] / w["num_blocks"])
                self.kv_blocks.labels(name).set(w["free_blocks"])
        self.pending.set(stats.get("num_pending", 0))
        self.retries.set(stats.get("counters", {}).get("retries", 0))

    def serve(self, port: int, host: str = "127.0.0.1"):
        """Expose /metrics over HTTP; returns (server, thread)."""
        return start_http_server(port, addr=host, registry=self.registry)
