"""Deployment files pass their schemas offline (Ray's launcher schema; Kubernetes from
kubernetes-validate; KubeRay from tests/deploy/schemas/) and say what they must: the ports and
flags `disagg serve` really has, token auth, a head-only Service, /dev/shm, the model volume."""
import json
import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from cluster.cli import build_parser
from cluster.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBE_VERSION = "1.33"           # oldest Kubernetes with every field used here (gRPC probes: 1.27)
KUBERAY_SCHEMA = json.loads((Path(__file__).parent / "schemas" / "kuberay-v1.json").read_text())


def _docs(name):
    return [d for d in yaml.safe_load_all((DEPLOY / "kuberay" / name).read_text()) if d]


def _kuberay_docs():
    return {name: _docs(name) for name in ("rayservice.yaml", "rayjob.yaml", "model-volume.yaml")}


def _cluster_spec(doc):
    return doc["spec"]["rayClusterConfig" if doc["kind"] == "RayService" else "rayClusterSpec"]


def _pod_templates(doc):
    if doc["kind"] in ("RayService", "RayJob"):
        spec = _cluster_spec(doc)
        return [spec["headGroupSpec"]["template"], *(g["template"] for g in spec.get("workerGroupSpecs", []))]
    return [doc["spec"]["template"]] if doc["kind"] == "Job" else []


def validate(doc):
    """Raise if `doc` breaks its schema: KubeRay's for its CRs, Kubernetes' for the rest and for
    every pod template (strict: unknown fields are errors)."""
    if doc["kind"] in ("RayService", "RayJob"):
        schema = {**KUBERAY_SCHEMA, "$ref": f"#/$defs/{doc['kind']}"}
        jsonschema.Draft202012Validator(schema).validate(doc)
    else:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    for template in _pod_templates(doc):
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                                      "template": template}, KUBE_VERSION, strict=True)


def _serve_defaults():
    return build_parser().parse_args(["serve"])


def test_kuberay_manifests_pass_the_schemas():
    kinds = []
    for docs in _kuberay_docs().values():
        for doc in docs:
            validate(doc)
            kinds.append(doc["kind"])
    assert sorted(kinds) == ["Job", "PersistentVolumeClaim", "RayJob", "RayService", "Service", "Service"]


@pytest.mark.parametrize("break_it", [
    lambda d: d["spec"].__setitem__("serveConfigV3", ""),                                       # KubeRay field
    lambda d: _cluster_spec(d)["headGroupSpec"]["template"]["spec"]["containers"][0].__setitem__("imagee", "x"),
    lambda d: _cluster_spec(d)["headGroupSpec"]["template"]["spec"]["volumes"][2]["emptyDir"].__setitem__("medium", 1),
])
def test_the_schema_check_catches_mistakes(break_it):
    doc = _docs("rayservice.yaml")[0]
    break_it(doc)
    with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError)):
        validate(doc)


@pytest.mark.parametrize("name", ["rayservice.yaml", "rayjob.yaml"])
def test_ray_cluster_spec(name):
    cr, service = _docs(name)
    spec = _cluster_spec(cr)
    assert spec["authOptions"] == {"mode": "token"} and spec["rayVersion"] == "2.60.0"
    head = spec["headGroupSpec"]["template"]
    pvc = next(d for d in _docs("model-volume.yaml") if d["kind"] == "PersistentVolumeClaim")
    for template in _pod_templates(cr):
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in template["spec"]["containers"][0]["volumeMounts"]}
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
        assert volumes[mounts["/models"]]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    container = head["spec"]["containers"][0]
    assert container["readinessProbe"]["exec"]["command"][:3] == ["python", "-m", "cluster.readiness"]
    # The Service selects this CR's head only, and forwards ports the head container declares.
    assert service["spec"]["selector"] == {"app.kubernetes.io/instance": head["metadata"]["labels"]["app.kubernetes.io/instance"],
                                           "ray.io/node-type": "head"}
    declared = {p["containerPort"] for p in container["ports"]}
    defaults = _serve_defaults()
    assert {p["targetPort"] for p in service["spec"]["ports"]} == {defaults.port, defaults.metrics_port, 8000} <= declared
    assert {p["targetPort"] for p in service["spec"]["ports"]}.isdisjoint({6379, 8265})


def test_service_labels_are_unique_per_custom_resource():
    instances = [_cluster_spec(docs[0])["headGroupSpec"]["template"]["metadata"]["labels"]["app.kubernetes.io/instance"]
                 for name, docs in _kuberay_docs().items() if name != "model-volume.yaml"]
    assert len(set(instances)) == len(instances)


def test_rayjob_entrypoint_is_a_valid_serve_command():
    job = _docs("rayjob.yaml")[0]
    argv = job["spec"]["entrypoint"].split()
    assert argv[:2] == ["disagg", "serve"]
    args = build_parser().parse_args(argv[1:])
    assert args.host == "0.0.0.0" and args.plan == "/etc/disagg/plan.json" and args.model.startswith("/models/")
    from cluster.readiness import READY_FILE
    assert args.ready_file == READY_FILE
    assert job["spec"]["backoffLimit"] >= 1


def test_rayservice_serve_config_deploys_the_supervisor():
    from ray.serve.schema import ServeDeploySchema

    from cluster import serve_app
    service = _docs("rayservice.yaml")[0]
    assert service["spec"]["upgradeStrategy"] == {"type": "None"}
    config = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    assert config.http_options.port != 8000, "disagg serve's HTTP front owns 8000"
    serve_port = next(p["containerPort"] for p in _cluster_spec(service)["headGroupSpec"]["template"]["spec"]
                      ["containers"][0]["ports"] if p["name"] == "serve")
    assert serve_port == config.http_options.port
    (app,) = config.applications
    module, _, attr = app.import_path.partition(":")
    assert (module, attr) == ("cluster.serve_app", "app")
    serve_app.app(app.args)                      # the builder accepts the args
    argv = serve_app.serve_command(app.args["serve_args"].split(), "10.0.0.1:6379")
    args = build_parser().parse_args(argv[argv.index("serve"):])
    assert args.host == "0.0.0.0" and args.ray_address == "10.0.0.1:6379" and args.model.startswith("/models/")


def test_model_download_job_writes_where_the_servers_read():
    pvc, job = _docs("model-volume.yaml")
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    served = build_parser().parse_args(_docs("rayjob.yaml")[0]["spec"]["entrypoint"].split()[1:]).model
    assert env["MODEL_DIR"] == served
    compile(container["command"][2], "download", "exec")


def test_launcher_config_passes_ray_schema_and_is_secure():
    from ray.autoscaler._private.util import prepare_config, validate_config
    config = yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())
    validate_config(prepare_config(json.loads(json.dumps(config))))
    assert config["provider"]["type"] == "aws" and config["auth"]["ssh_user"] == "ubuntu"
    for name, node in config["available_node_types"].items():
        assert "ubuntu" in node["node_config"]["ImageId"] and "nvidia-driver" in node["node_config"]["ImageId"]
        if name != config["head_node_type"]:
            assert node["min_workers"] == 0
    assert "--gpus all" in config["docker"]["worker_run_options"]
    starts = config["head_start_ray_commands"][1:] + config["worker_start_ray_commands"][1:]
    assert all(cmd.startswith("RAY_AUTH_MODE=token ") for cmd in starts)
    assert "--dashboard-host=127.0.0.1" in config["head_start_ray_commands"][1]
    assert "~/.ray/auth_token" in config["file_mounts"]
    opened = {p["FromPort"] for p in config["provider"]["security_group"]["IpPermissions"]}
    defaults = _serve_defaults()
    assert opened == {defaults.port, 8000, defaults.metrics_port}


def test_prometheus_scrapes_the_metrics_port():
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    assert prom["scrape_configs"][0]["static_configs"][0]["targets"] == [f"127.0.0.1:{_serve_defaults().metrics_port}"]


def test_dashboard_queries_only_our_metrics():
    dash = json.loads((DEPLOY / "grafana" / "disagg-serve-dashboard.json").read_text())
    names = {m.name for m in Metrics().registry.collect()}
    exported = set()
    for n in names:
        exported |= {n, n + "_total", n + "_bucket", n + "_count", n + "_sum"}
    used = {m for p in dash["panels"] for t in p["targets"] for m in re.findall(r"disagg_[a-z0-9_]+", t["expr"])}
    assert used and used <= exported, used - exported
