"""A cluster served over gRPC from a background event loop, for tests of the frontend."""
import asyncio
import json
import os
import threading
import time

from cluster.api import Cluster
from cluster.grpc_server import start_server
from cluster.metrics import Metrics
from engine.plan import Plan


class Server:
    """Cluster + gRPC server(s) + metrics on a background loop. `auth_token` adds a second
    server on the same cluster that requires it."""

    def __init__(self, plan: dict, auth_token: str | None = None, **limits):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.metrics = Metrics()
        self.cluster = Cluster(Plan.from_dict(plan), self.metrics, **limits)
        self.run(self.cluster.astart(), timeout=240)
        self.server, self.port = self.run(start_server(self.cluster, "127.0.0.1", 0))
        self.auth_server = self.auth_port = None
        if auth_token:
            self.auth_server, self.auth_port = self.run(start_server(self.cluster, "127.0.0.1", 0, auth_token=auth_token))
        self.http, _ = self.metrics.serve(0)

    def run(self, coro, timeout=120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stats(self):
        return self.run(self.cluster.astats())

    def wait_all_free(self, timeout=15.0):
        """Poll until every worker's blocks are free and nothing is tracked; returns stats."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.stats()
            bad = {k: w for k, w in st["workers"].items() if w.get("free_blocks") != w.get("num_blocks")}
            if not bad and not st["num_tracked"]:
                return st
            if time.monotonic() > deadline:
                raise AssertionError(f"blocks not freed: {bad}, tracked {st['num_tracked']}")
            time.sleep(0.1)

    def close(self):
        for s in (self.server, self.auth_server):
            if s is not None:
                self.run(s.stop(0))
        self.run(self.cluster.ashutdown())
        self.http.shutdown()
        self.loop.call_soon_threadsafe(self.loop.stop)


def record(section: str, figures: dict) -> None:
    """Append measured figures to $DISAGG_RELIABILITY_OUT (JSON lines) when set."""
    path = os.environ.get("DISAGG_RELIABILITY_OUT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"section": section, **figures}) + "\n")
