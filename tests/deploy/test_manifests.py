"""Deployment files parse, and the dashboard and scrape config use our metric names and ports."""
import json
import re
from pathlib import Path

import yaml

from cluster.metrics import Metrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_yaml_files_parse():
    assert yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())["cluster_name"] == "disagg-serve"
    docs = [d for d in yaml.safe_load_all((DEPLOY / "kuberay" / "rayjob.yaml").read_text()) if d]
    job = next(d for d in docs if d["kind"] == "RayJob")
    assert job["spec"]["entrypoint"].startswith("disagg serve")
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    assert prom["scrape_configs"][0]["static_configs"][0]["targets"] == ["127.0.0.1:9400"]


def test_dashboard_queries_only_our_metrics():
    dash = json.loads((DEPLOY / "grafana" / "disagg-serve-dashboard.json").read_text())
    names = {m.name for m in Metrics().registry.collect()}
    exported = set()
    for n in names:
        exported |= {n, n + "_total", n + "_bucket", n + "_count", n + "_sum"}
    used = {m for p in dash["panels"] for t in p["targets"] for m in re.findall(r"disagg_[a-z0-9_]+", t["expr"])}
    assert used and used <= exported, used - exported
