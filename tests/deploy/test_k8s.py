"""Kubernetes manifests: kustomize renders both overlays; every object validates (strict) against the Kubernetes
OpenAPI schemas shipped offline by kubernetes-validate; and the objects fit together (probes, store, auth, grace)."""

from __future__ import annotations

import json
import shutil
import subprocess
from functools import lru_cache

import pytest
import yaml

# kubernetes-validate is a dev dependency: when it is missing this module fails to import instead of skipping.
from kubernetes_validate import utils as kv

from ._helpers import DEPLOY, METRICS

K8S = DEPLOY / "k8s"
OVERLAYS = ["cpu", "gpu"]
# The oldest and the newest Kubernetes minor versions whose schemas kubernetes-validate ships.
VERSIONS = sorted({kv.all_versions()[0], kv.latest_version()})


def _kustomize_cmd() -> list[str] | None:
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    return None


needs_kustomize = pytest.mark.skipif(_kustomize_cmd() is None,
                                     reason="neither kubectl nor kustomize is installed: cannot render the overlays")


@lru_cache(maxsize=None)
def render(overlay: str) -> tuple[dict, ...]:
    proc = subprocess.run([*_kustomize_cmd(), str(K8S / "overlays" / overlay)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


def by_kind(docs, kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs, kind: str) -> dict:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _validate(doc: dict, version: str) -> None:
    try:
        kv.validate(doc, version, strict=True)
    except kv.ValidationError as exc:
        raise AssertionError(f"{doc['kind']}/{doc['metadata']['name']} is invalid for Kubernetes {version}:\n"
                             f"{str(exc)[:1500]}") from None


BASE_FILES = sorted(p for p in (K8S / "base").glob("*.yaml") if p.name != "kustomization.yaml")


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", BASE_FILES, ids=lambda p: p.name)
def test_base_manifest_validates_against_the_openapi_schema(path, version):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for doc in docs:
        _validate(doc, version)


def test_base_kustomization_lists_every_manifest():
    kust = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    assert sorted(kust["resources"]) == sorted(p.name for p in BASE_FILES)


@needs_kustomize
@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_overlay_validates_against_the_openapi_schema(overlay, version):
    docs = render(overlay)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(["ConfigMap", "Secret", "PersistentVolumeClaim", "Deployment", "Deployment", "Service",
                            "HorizontalPodAutoscaler", "PodDisruptionBudget"]), kinds
    for doc in docs:
        _validate(doc, version)


def deployment(docs, name: str = "promptserve") -> dict:
    """The server's Deployment (or the fine-tuning workers', name promptserve-worker)."""
    found = [d for d in by_kind(docs, "Deployment") if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one Deployment {name}, found {len(found)}"
    return found[0]


def _container(docs) -> dict:
    containers = deployment(docs)["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _config(docs) -> dict:
    return one(docs, "ConfigMap")["data"]


def _matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@needs_kustomize
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_port_and_config(overlay):
    docs = render(overlay)
    c = _container(docs)
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["startupProbe"]["httpGet"]["path"] in ("/health", "/ready")
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["port"] in ("http", ports["http"])
    cfg = _config(docs)
    assert int(cfg["PROMPTSERVE_PORT"]) == ports["http"]
    assert [e["configMapRef"]["name"] for e in c["envFrom"]] == [one(docs, "ConfigMap")["metadata"]["name"]]
    assert cfg["PROMPTSERVE_ALLOW_INSECURE_BIND"] in ("0", "false"), "replicas must never serve without keys"
    res = c["resources"]
    assert res["requests"]["cpu"] and res["requests"]["memory"] and res["limits"]["memory"]


@needs_kustomize
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_replica_mounts_the_one_rwx_store_at_data(overlay):
    docs = render(overlay)
    pvc = one(docs, "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    pod = deployment(docs)["spec"]["template"]["spec"]
    vols = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in _container(docs)["volumeMounts"]}
    store = vols[mounts["/data"]["name"]]
    assert store["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert _config(docs)["PROMPTSERVE_STORE"] == "/data"


@needs_kustomize
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_auth_secret_is_mounted_as_the_auth_file(overlay):
    docs = render(overlay)
    secret = one(docs, "Secret")
    pod = deployment(docs)["spec"]["template"]["spec"]
    auth_path = _config(docs)["PROMPTSERVE_AUTH_FILE"]
    mount = [m for m in _container(docs)["volumeMounts"] if auth_path.startswith(m["mountPath"].rstrip("/") + "/")]
    assert len(mount) == 1 and mount[0].get("readOnly") is True
    vol = {v["name"]: v for v in pod["volumes"]}[mount[0]["name"]]
    assert vol["secret"]["secretName"] == secret["metadata"]["name"]
    key = auth_path[len(mount[0]["mountPath"].rstrip("/")) + 1:]

    auth = json.loads(secret["stringData"][key])
    assert set(auth) == {"keys"} and all({"tenant", "admin"} <= set(v) for v in auth["keys"].values())


@needs_kustomize
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_termination_grace_covers_prestop_and_server_drain(overlay):
    docs = render(overlay)
    pod = deployment(docs)["spec"]["template"]["spec"]
    pre = _container(docs)["lifecycle"]["preStop"]
    cmd = pre["exec"]["command"]
    assert cmd[0] == "sleep"
    drain = float(_config(docs)["PROMPTSERVE_SHUTDOWN_GRACE_S"])
    total = pod["terminationGracePeriodSeconds"]
    assert total >= int(cmd[1]) + drain + 5, "SIGKILL would cut the drain short"
    assert total <= int(cmd[1]) + drain + 30, "a much longer period only delays rollouts"


@needs_kustomize
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_hpa_pdb_target_the_deployment(overlay):
    docs = render(overlay)
    dep = deployment(docs)
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert _matches(dep["spec"]["selector"]["matchLabels"], labels)
    assert "replicas" not in dep["spec"], "the HPA owns the replica count"
    svc = one(docs, "Service")
    assert _matches(svc["spec"]["selector"], labels)
    assert svc["spec"]["ports"][0]["targetPort"] in ("http", 8000)
    pdb = one(docs, "PodDisruptionBudget")
    assert _matches(pdb["spec"]["selector"]["matchLabels"], labels)
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", dep["metadata"]["name"])
    min_available = pdb["spec"].get("minAvailable", 0)
    assert hpa["spec"].get("minReplicas", 1) > min_available, "the PDB would block every node drain"
    assert all(d["metadata"].get("namespace") == "promptserve" for d in docs)


@needs_kustomize
def test_cpu_and_gpu_variants():
    cpu, gpu = render("cpu"), render("gpu")
    cpu_c, gpu_c = _container(cpu), _container(gpu)
    assert cpu_c["image"].endswith(":cpu") and gpu_c["image"].endswith(":cuda")
    assert "nvidia.com/gpu" not in cpu_c["resources"].get("limits", {})
    assert gpu_c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert _config(gpu)["PROMPTSERVE_DEVICE"] == "cuda" and _config(cpu)["PROMPTSERVE_DEVICE"] == "cpu"
    tolerations = deployment(gpu)["spec"]["template"]["spec"]["tolerations"]
    assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)
    # The GPU HPA scales on a metric the server exports.

    metrics = one(gpu, "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert [m["pods"]["metric"]["name"] for m in metrics if m["type"] == "Pods"] == ["promptserve_waiting_requests"]
    assert METRICS["promptserve_waiting_requests"] == "gauge"


@needs_kustomize
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_fine_tuning_workers_share_the_store_and_configuration(overlay):
    """`python -m training worker` beside the servers: the same image, ConfigMap and store volume; no Service or
    PDB selects it; time to checkpoint on SIGTERM; a GPU in the GPU overlay."""
    docs = render(overlay)
    worker = deployment(docs, "promptserve-worker")
    pod = worker["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["args"][:4] == ["python", "-m", "training", "worker"]
    assert c["image"] == _container(docs)["image"]
    assert [e["configMapRef"]["name"] for e in c["envFrom"]] == [one(docs, "ConfigMap")["metadata"]["name"]]
    store = {v["name"]: v for v in pod["volumes"]}[{m["mountPath"]: m for m in c["volumeMounts"]}["/data"]["name"]]
    assert store["persistentVolumeClaim"]["claimName"] == one(docs, "PersistentVolumeClaim")["metadata"]["name"]
    labels = worker["spec"]["template"]["metadata"]["labels"]
    assert not _matches(one(docs, "Service")["spec"]["selector"], labels)
    assert not _matches(one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], labels)
    assert pod["terminationGracePeriodSeconds"] >= 60
    assert ("nvidia.com/gpu" in c["resources"]["limits"]) == (overlay == "gpu")
