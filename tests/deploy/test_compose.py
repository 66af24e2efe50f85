"""deploy/docker-compose.yml and the Prometheus/Grafana files it mounts: the compose file validates against the
Compose Specification schema (shipped offline by check-jsonschema), and the pieces point at each other."""

from __future__ import annotations

import importlib.resources
import json
import re
import shutil
import subprocess

import jsonschema
import pytest
import yaml

from ._helpers import DEPLOY, metric_family, promql_series

COMPOSE = DEPLOY / "docker-compose.yml"


def _interpolate(value, env: dict[str, str]):
    """Compose's ${VAR}, ${VAR:-default} and ${VAR-default}, as `docker compose config` resolves them."""
    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        name, op, default = m.group(1), m.group(2), m.group(3) or ""
        if op == ":-":
            return env.get(name) or default
        if op == "-":
            return env.get(name, default)
        return env.get(name, "")
    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\}", sub, value)


def compose(env: dict[str, str] | None = None) -> dict:
    return _interpolate(yaml.safe_load(COMPOSE.read_text()), env or {})


def _compose_schema() -> dict:
    res = importlib.resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    return json.loads(res.read_text())


@pytest.mark.parametrize("env", [{}, {"PROMPTSERVE_AUTH_FILE": "/run/secrets/auth.json",
                                      "PROMPTSERVE_ALLOW_INSECURE_BIND": "0"}], ids=["defaults", "with-auth"])
def test_compose_file_validates_against_the_compose_spec(env):
    schema = _compose_schema()
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(compose(env)), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)


def test_schema_check_catches_a_broken_file():
    """Guard the check itself: the vendored schema rejects an unknown service key and a wrongly typed field."""
    doc = compose()
    doc["services"]["promptserve"]["portz"] = ["8000:8000"]
    doc["services"]["grafana"]["depends_on"] = 3
    assert len(list(jsonschema.Draft202012Validator(_compose_schema()).iter_errors(doc))) >= 2


def _mounts(service: dict) -> dict[str, str]:
    """container path -> host source, for bind mounts written as short syntax."""
    out = {}
    for vol in service.get("volumes", []):
        parts = vol.split(":")
        out[parts[1]] = parts[0]
    return out


def test_build_context_and_bind_mounts_exist():
    doc = compose()
    build = doc["services"]["promptserve"]["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert (context / build["dockerfile"]).is_file()
    assert set(build["args"]) <= {"BASE", "TORCH_SPEC", "PIP_EXTRA_INDEX_URL"}
    dockerfile = (context / build["dockerfile"]).read_text()
    for arg in build["args"]:
        assert re.search(rf"^ARG {arg}=", dockerfile, re.M), f"build arg {arg} is not declared in the Dockerfile"
    for name, service in doc["services"].items():
        for target, source in _mounts(service).items():
            if source.startswith((".", "/")):
                assert (COMPOSE.parent / source).exists(), f"{name}: {source} (mounted at {target}) is missing"
            else:
                assert source in doc["volumes"], f"{name}: named volume {source} is not declared"


def test_server_service_store_ports_and_stop_grace():
    svc = compose()["services"]["promptserve"]
    env = svc["environment"]
    assert env["PROMPTSERVE_STORE"] == "/data" and _mounts(svc)["/data"] == "promptserve-data"
    for port in svc["ports"]:
        host_ip = port.split(":")[0]
        assert host_ip == "127.0.0.1", f"publish on the host's loopback by default, not {port}"
    assert svc["ports"][0].endswith(f":{env['PROMPTSERVE_PORT']}")
    grace = float(env["PROMPTSERVE_SHUTDOWN_GRACE_S"])
    stop = svc["stop_grace_period"]
    assert stop.endswith("s") and float(stop[:-1]) > grace, "Docker must wait longer than the server drains"


def test_prometheus_scrapes_the_server_and_loads_the_alerts():
    doc = compose()
    prom_mounts = _mounts(doc["services"]["prometheus"])
    cfg = yaml.safe_load((COMPOSE.parent / prom_mounts["/etc/prometheus/prometheus.yml"]).read_text())
    server_port = doc["services"]["promptserve"]["environment"]["PROMPTSERVE_PORT"]
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    job = jobs["promptserve"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"promptserve:{server_port}"]
    for rule_file in cfg["rule_files"]:
        assert rule_file in prom_mounts, f"{rule_file} is not mounted into the Prometheus container"


def test_alert_rules_query_only_contract_metrics():
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    seen = set()
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert rule["alert"] and rule["expr"] and rule["annotations"]["summary"]
            for series in promql_series(rule["expr"]):
                seen.add(metric_family(series))
    assert {"promptserve_requests_total", "promptserve_waiting_requests", "promptserve_queue_wait_seconds"} <= seen


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard():
    doc = compose()
    mounts = _mounts(doc["services"]["grafana"])
    prov = COMPOSE.parent / mounts["/etc/grafana/provisioning"]
    ds = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert len(ds) == 1 and ds[0]["type"] == "prometheus"
    assert ds[0]["url"] == "http://prometheus:9090" and "prometheus" in doc["services"]
    assert "127.0.0.1:9090:9090" in doc["services"]["prometheus"]["ports"]
    providers = yaml.safe_load((prov / "dashboards" / "promptserve.yml").read_text())["providers"]
    path = providers[0]["options"]["path"]
    host_dir = COMPOSE.parent / mounts[path]
    dashboards = sorted(host_dir.glob("*.json"))
    assert [p.name for p in dashboards] == ["promptserve.json"]
    panels = json.loads(dashboards[0].read_text())["panels"]
    uids = {t["datasource"]["uid"] for p in panels for t in p.get("targets", [])}
    assert uids == {ds[0]["uid"]}
    home = doc["services"]["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{path}/promptserve.json"


def _compose_cli() -> list[str] | None:
    """The Compose v2 plugin, else the v1 `docker-compose` (Debian's package), else None."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True,
                                                 timeout=30).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


@pytest.mark.skipif(_compose_cli() is None,
                    reason="neither `docker compose` nor `docker-compose` is installed; the schema check above ran")
def test_docker_compose_config():
    cli = _compose_cli()
    text = COMPOSE.read_text()
    if cli == ["docker-compose"]:  # v1 predates the top-level `name:` key; everything else must validate as is
        doc = yaml.safe_load(text)
        doc.pop("name", None)
        text = yaml.safe_dump(doc)
    proc = subprocess.run([*cli, "-f", "-", "--project-directory", str(COMPOSE.parent), "config", "--quiet"],
                          input=text, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool not installed (Debian package prometheus); the YAML checks above ran")
def test_promtool_checks_config_and_rules(tmp_path):
    rules = DEPLOY / "prometheus" / "alerts.yml"
    proc = subprocess.run(["promtool", "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cfg = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    cfg["rule_files"] = [str(rules)]  # the container path, mapped back to the repository
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run(["promtool", "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
