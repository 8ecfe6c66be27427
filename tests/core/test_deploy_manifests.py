"""deploy/: the Kubernetes manifests and nginx.conf parse, and point at endpoints, entry points and
settings that really exist in this code base."""
from __future__ import annotations

import importlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT

K8S = ROOT / "deploy" / "k8s"
SETTINGS_SOURCE = (ROOT / "kotaemon_site" / "settings.py").read_text()


def manifests() -> dict[tuple[str, str], dict]:
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is None:
                continue
            assert {"apiVersion", "kind"} <= set(doc), path
            if doc["kind"] == "Kustomization":
                docs[("Kustomization", path.name)] = doc
                continue
            name = doc["metadata"]["name"]
            assert (doc["kind"], name) not in docs, f"duplicate {doc['kind']}/{name}"
            docs[(doc["kind"], name)] = doc
    return docs


DOCS = manifests()


def deployment(name: str) -> dict:
    return DOCS[("Deployment", name)]


def container(doc: dict) -> dict:
    containers = doc["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def settings_reads(name: str) -> bool:
    """settings.py reads this environment variable (env("X"...), env.int("X"...), ...)."""
    return re.search(r'env(?:\.\w+)?\(\s*"' + re.escape(name) + r'"', SETTINGS_SOURCE) is not None


def test_every_file_parses_and_the_kustomization_lists_them_all():
    kustomization = DOCS[("Kustomization", "kustomization.yaml")]
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    kinds = {kind for kind, _ in DOCS}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap", "Secret"} <= kinds


def test_web_probes_hit_the_real_health_endpoints():
    from django.urls import resolve

    from apps.monitoring import views

    web = container(deployment("kotaemon-web"))
    port_names = {p["name"]: p["containerPort"] for p in web["ports"]}
    expected = {"readinessProbe": (views.readyz, "/readyz"), "livenessProbe": (views.healthz, "/healthz"),
                "startupProbe": (views.healthz, "/healthz")}
    config = DOCS[("ConfigMap", "kotaemon-config")]["data"]
    allowed = config["ALLOWED_HOSTS"].split(",")
    for probe, (view, path) in expected.items():
        get = web[probe]["httpGet"]
        assert get["path"] == path
        assert resolve(get["path"]).func is view
        assert get["port"] in port_names or get["port"] in port_names.values()
        # Probes come to the pod IP; Django answers them only for a Host it allows.
        host = {h["name"]: h["value"] for h in get.get("httpHeaders", [])}.get("Host")
        assert host in allowed, f"{probe} Host header {host!r} is not in ALLOWED_HOSTS {allowed}"


def test_probe_paths_are_exempt_from_the_ssl_redirect(settings):
    for path in ("healthz", "readyz"):
        assert any(re.match(pattern, path) for pattern in settings.SECURE_REDIRECT_EXEMPT)


def test_web_command_is_the_real_asgi_entry_point():
    command = container(deployment("kotaemon-web"))["command"]
    assert command[0] == "uvicorn"
    module_name, attribute = command[1].split(":")
    application = getattr(importlib.import_module(module_name), attribute)
    assert callable(application)
    from apps.core.cluster import ClusterLifespan

    assert isinstance(application, ClusterLifespan)  # the runtime starts from the lifespan
    port = int(command[command.index("--port") + 1])
    assert port in [p["containerPort"] for p in container(deployment("kotaemon-web"))["ports"]]
    assert "--workers" not in command  # one process per pod; the HPA scales pods


@pytest.mark.parametrize("name, subcommand", [("kotaemon-worker", "worker"), ("kotaemon-beat", "beat")])
def test_celery_commands_use_the_real_app(name, subcommand):
    from celery import Celery

    from celery.app.utils import find_app

    command = container(deployment(name))["command"]
    assert command[:4] == ["celery", "-A", "kotaemon_site", subcommand]
    app = find_app(command[2])  # how the celery CLI resolves -A
    assert isinstance(app, Celery) and app.main == "kotaemon_site"
    assert subcommand in ("worker", "beat")
    assert shutil.which(command[0], path=str(Path(sys.executable).parent)), "celery is not installed in the venv"


def test_beat_is_a_singleton():
    beat = deployment("kotaemon-beat")
    assert beat["spec"]["replicas"] == 1 and beat["spec"]["strategy"]["type"] == "Recreate"


def test_worker_liveness_pings_its_own_node_name():
    worker = container(deployment("kotaemon-worker"))
    node = worker["command"][worker["command"].index("-n") + 1]
    assert node == "worker@%h"
    probe = " ".join(worker["livenessProbe"]["exec"]["command"])
    assert "celery -A kotaemon_site inspect ping" in probe and "worker@$HOSTNAME" in probe


def test_migrate_job_runs_a_real_management_command():
    from django.core.management import get_commands

    command = DOCS[("Job", "kotaemon-migrate")]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:2] == ["python", "manage.py"] and (ROOT / "manage.py").exists()
    assert command[2] in get_commands()


def test_hpa_scales_the_web_deployment():
    hpa = DOCS[("HorizontalPodAutoscaler", "kotaemon-web")]["spec"]
    target = hpa["scaleTargetRef"]
    assert (target["kind"], target["name"]) in DOCS and target["kind"] == "Deployment"
    assert target["name"] == "kotaemon-web"
    assert 2 <= hpa["minReplicas"] <= hpa["maxReplicas"]


def test_service_selects_the_web_pods_on_the_http_port():
    service = DOCS[("Service", "kotaemon-web")]["spec"]
    labels = deployment("kotaemon-web")["spec"]["template"]["metadata"]["labels"]
    assert service["selector"].items() <= labels.items()
    assert deployment("kotaemon-web")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ports = {p["name"] for p in container(deployment("kotaemon-web"))["ports"]}
    assert all(p["targetPort"] in ports for p in service["ports"])
    for other in ("kotaemon-worker", "kotaemon-beat"):  # the Service must not send traffic to workers
        other_labels = deployment(other)["spec"]["template"]["metadata"]["labels"]
        assert not service["selector"].items() <= other_labels.items()


def test_env_sources_exist_and_every_variable_is_read_by_settings():
    config = DOCS[("ConfigMap", "kotaemon-config")]["data"]
    secret = DOCS[("Secret", "kotaemon-secrets")]["stringData"]
    for name in list(config) + list(secret):
        assert settings_reads(name), f"{name} is set in deploy/k8s but settings.py never reads it"
    assert {"SECRET_KEY", "DATABASE_URL", "REDIS_URL"} <= set(secret)
    assert not {"SECRET_KEY", "DATABASE_URL", "REDIS_URL"} & set(config)  # secrets stay in the Secret
    for name in ("kotaemon-web", "kotaemon-worker", "kotaemon-beat"):
        sources = container(deployment(name))["envFrom"]
        refs = {(k, v["name"]) for source in sources for k, v in source.items()}
        assert refs == {("configMapRef", "kotaemon-config"), ("secretRef", "kotaemon-secrets")}
        for var in container(deployment(name)).get("env", []):
            assert settings_reads(var["name"]) or var["name"] in ("OMP_NUM_THREADS", "HOME")


def test_web_and_workers_share_the_index_volume():
    config = DOCS[("ConfigMap", "kotaemon-config")]["data"]
    claim = DOCS[("PersistentVolumeClaim", "kotaemon-data")]
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    for name in ("kotaemon-web", "kotaemon-worker"):
        spec = deployment(name)["spec"]["template"]["spec"]
        volumes = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"]
                   if "persistentVolumeClaim" in v}
        mounts = {m["name"]: m["mountPath"] for m in container(deployment(name))["volumeMounts"]}
        assert any(volumes.get(v) == "kotaemon-data" and config["INDEX_ROOT"].startswith(path)
                   for v, path in mounts.items()), name


@pytest.mark.parametrize("name", ["kotaemon-web", "kotaemon-worker", "kotaemon-beat"])
def test_pods_run_unprivileged_on_a_read_only_root(name):
    spec = deployment(name)["spec"]["template"]["spec"]
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True and isinstance(pod["runAsUser"], int) and pod["runAsUser"] > 0
    assert pod["runAsGroup"] > 0 and pod["seccompProfile"] == {"type": "RuntimeDefault"}
    box = container(deployment(name))["securityContext"]
    assert box["allowPrivilegeEscalation"] is False and box["readOnlyRootFilesystem"] is True
    assert box["capabilities"] == {"drop": ["ALL"]} and "add" not in box["capabilities"]
    assert not box.get("privileged") and box.get("runAsUser", pod["runAsUser"]) > 0
    # A read-only root needs somewhere to write: /tmp is an emptyDir, HOME points there (beat keeps its
    # schedule file there too).
    emptydirs = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
    mounts = {m["mountPath"]: m["name"] for m in container(deployment(name))["volumeMounts"]}
    assert mounts.get("/tmp") in emptydirs
    env = {e["name"]: e.get("value") for e in container(deployment(name)).get("env", [])}
    assert env.get("HOME") == "/tmp"
    command = container(deployment(name))["command"]
    assert all(not arg.startswith("/") or arg.startswith("/tmp/") for arg in command)


def test_rolling_update_keeps_capacity():
    strategy = deployment("kotaemon-web")["spec"]["strategy"]
    assert strategy["rollingUpdate"]["maxUnavailable"] == 0


def test_readme_documents_the_same_commands():
    readme = (ROOT / "deploy" / "README.md").read_text()
    for name in ("kotaemon-web", "kotaemon-worker", "kotaemon-beat"):
        command = container(deployment(name))["command"]
        assert " ".join(command[:4]) in readme, f"deploy/README.md does not show {' '.join(command[:4])}"
    for variable in ("DATABASE_URL", "REDIS_URL", "SECRET_KEY", "ALLOWED_HOSTS", "CELERY_BROKER_URL"):
        assert variable in readme


# --- nginx ------------------------------------------------------------------------------------
NGINX = (ROOT / "deploy" / "nginx.conf").read_text()


def test_nginx_balances_on_the_session_with_consistent_hashing():
    upstream = re.search(r"upstream\s+kotaemon_web\s*\{(.*?)\}", NGINX, re.S).group(1)
    assert re.search(r"^\s*hash\s+\$kotaemon_affinity\s+consistent;", upstream, re.M)
    assert len(re.findall(r"^\s*server\s+\S+", upstream, re.M)) >= 2
    for source in ("$http_x_session_id", "$cookie_kotaemon_session", "/ws/chat/", "/api/v1/conversations/"):
        assert source in NGINX
    assert "proxy_set_header Upgrade $http_upgrade;" in NGINX
    assert "proxy_set_header Connection $connection_upgrade;" in NGINX


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed (CI installs it)")
def test_nginx_accepts_the_config(tmp_path):
    result = subprocess.run(["nginx", "-t", "-p", str(tmp_path), "-c", str(ROOT / "deploy" / "nginx.conf")],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
