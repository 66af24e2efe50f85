"""Every PROMPTSERVE_* variable the deployment sets is a real server setting with a valid value, and the runbook
documents every setting. (The server ignores unknown PROMPTSERVE_* variables, so a typo would silently fall back to
the default: this is the only place that would notice.)"""

from __future__ import annotations

import os
import re

import pytest
import yaml

from server.config import Settings

from ._helpers import DEPLOY, ROOT, dockerfile_env, parse_dockerfile
from .test_compose import compose

EXTRA = {"PROMPTSERVE_CACHE"}  # read by prompt_core.model, not by the server's settings
SETTINGS = {f"PROMPTSERVE_{name.upper()}" for name in Settings.model_fields}


def _configmaps() -> dict[str, dict[str, str]]:
    base = yaml.safe_load((DEPLOY / "k8s" / "base" / "configmap.yaml").read_text())["data"]
    out = {"base": dict(base)}
    for overlay in ("cpu", "gpu"):
        kust = yaml.safe_load((DEPLOY / "k8s" / "overlays" / overlay / "kustomization.yaml").read_text())
        merged = dict(base)
        for gen in kust.get("configMapGenerator", []):
            assert gen["name"] == "promptserve-config" and gen.get("behavior") == "merge"
            merged.update(lit.split("=", 1) for lit in gen.get("literals", []))
        out[overlay] = merged
    return out


def _sources() -> dict[str, dict[str, str]]:
    srcs = {"Dockerfile": {k: v for k, v in dockerfile_env(parse_dockerfile()).items() if k.startswith("PROMPTSERVE_")},
            "docker-compose.yml": {k: str(v) for k, v in compose()["services"]["promptserve"]["environment"].items()}}
    for name, data in _configmaps().items():
        srcs[f"configmap:{name}"] = data
    return srcs


def test_every_variable_set_is_a_server_setting():
    for source, env in _sources().items():
        unknown = sorted(k for k in env if k.startswith("PROMPTSERVE_") and k not in SETTINGS | EXTRA)
        assert not unknown, f"{source} sets variables the server does not read: {unknown}"


@pytest.mark.parametrize("source", sorted(_sources()))
def test_values_parse_as_the_server_reads_them(source, monkeypatch):
    for key in list(os.environ):
        if key.startswith("PROMPTSERVE_"):
            monkeypatch.delenv(key)
    env = {k: v for k, v in _sources()[source].items() if k in SETTINGS and v != ""}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    for key in env:
        assert getattr(settings, key[len("PROMPTSERVE_"):].lower()) is not None, key
    if source.startswith("configmap"):
        assert settings.allow_insecure_bind is False and settings.auth_file is not None
        settings.host = "0.0.0.0"
        settings.check_bind()  # the entrypoint picks 0.0.0.0 when the auth file exists; the server must accept it
        assert settings.shutdown_grace_s > 0


def test_runbook_documents_every_setting_flag_and_variable():
    text = (ROOT / "docs" / "runbook.md").read_text()
    for name in Settings.model_fields:
        assert f"`PROMPTSERVE_{name.upper()}`" in text, f"runbook misses PROMPTSERVE_{name.upper()}"
        assert f"`--{name.replace('_', '-')}`" in text, f"runbook misses --{name.replace('_', '-')}"
    assert "`PROMPTSERVE_CACHE`" in text
    documented = set(re.findall(r"`(PROMPTSERVE_[A-Z_]+)`", text))
    unknown = documented - SETTINGS - EXTRA
    assert not unknown, f"runbook documents variables that do not exist: {unknown}"
