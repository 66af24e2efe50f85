"""deploy/docker-entrypoint.sh: bind 0.0.0.0 only with an auth file or the explicit opt-in; run under /bin/sh."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from ._helpers import ROOT, dockerfile_env, parse_dockerfile

SCRIPT = ROOT / "deploy" / "docker-entrypoint.sh"


@pytest.fixture
def run(tmp_path):
    """Run the entrypoint with a fake `python` that records its argv and PROMPTSERVE_* environment."""
    record = tmp_path / "exec.json"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "python"
    fake.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                    f"json.dump({{'argv': sys.argv[1:], 'env': {{k: v for k, v in os.environ.items() "
                    f"if k.startswith('PROMPTSERVE_')}}}}, open({str(record)!r}, 'w'))\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)

    def _run(env: dict[str, str], *args: str):
        base = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTSERVE_")}
        base["PATH"] = f"{bindir}{os.pathsep}{base['PATH']}"
        base.update(env)
        if record.exists():
            record.unlink()
        proc = subprocess.run(["/bin/sh", str(SCRIPT), *args], env=base, capture_output=True, text=True, timeout=30)
        execd = json.loads(record.read_text()) if record.exists() else None
        return proc, execd
    return _run


@pytest.fixture
def auth_file(tmp_path):
    path = tmp_path / "auth.json"
    path.write_text(json.dumps({"keys": {"k1": {"tenant": "acme", "admin": False}}}))
    return path


def test_auth_file_binds_all_interfaces_without_warning(run, auth_file):
    proc, execd = run({"PROMPTSERVE_AUTH_FILE": str(auth_file), "PROMPTSERVE_ALLOW_INSECURE_BIND": "0"})
    assert proc.returncode == 0, proc.stderr
    assert execd["argv"] == ["-m", "server"]
    assert execd["env"]["PROMPTSERVE_HOST"] == "0.0.0.0"
    assert execd["env"]["PROMPTSERVE_AUTH_FILE"] == str(auth_file)
    assert "WARNING" not in proc.stderr


@pytest.mark.parametrize("opt_in", ["1", "0"])
def test_missing_auth_file_refuses_to_start_even_with_opt_in(run, tmp_path, opt_in):
    proc, execd = run({"PROMPTSERVE_AUTH_FILE": str(tmp_path / "nope.json"), "PROMPTSERVE_ALLOW_INSECURE_BIND": opt_in})
    assert proc.returncode != 0 and execd is None
    assert "PROMPTSERVE_AUTH_FILE" in proc.stderr and "not a readable file" in proc.stderr


def test_auth_file_that_is_a_directory_is_refused(run, tmp_path):
    proc, execd = run({"PROMPTSERVE_AUTH_FILE": str(tmp_path)})
    assert proc.returncode != 0 and execd is None


@pytest.mark.parametrize("value", ["1", "true", "YES", "on"])
def test_opt_in_binds_all_interfaces_with_loud_warning(run, value):
    proc, execd = run({"PROMPTSERVE_ALLOW_INSECURE_BIND": value, "PROMPTSERVE_PORT": "9001"})
    assert proc.returncode == 0, proc.stderr
    assert execd["env"]["PROMPTSERVE_HOST"] == "0.0.0.0"
    assert "WARNING" in proc.stderr and "WITHOUT AUTHENTICATION" in proc.stderr and "9001" in proc.stderr


@pytest.mark.parametrize("env", [{}, {"PROMPTSERVE_ALLOW_INSECURE_BIND": "0"},
                                 {"PROMPTSERVE_ALLOW_INSECURE_BIND": "false"},
                                 {"PROMPTSERVE_ALLOW_INSECURE_BIND": "0", "PROMPTSERVE_AUTH_FILE": ""}])
def test_no_auth_and_no_opt_in_refuses_to_start(run, env):
    proc, execd = run(env)
    assert proc.returncode != 0 and execd is None
    assert "PROMPTSERVE_ALLOW_INSECURE_BIND=1" in proc.stderr and "PROMPTSERVE_AUTH_FILE" in proc.stderr


def test_bad_boolean_is_an_error(run):
    proc, execd = run({"PROMPTSERVE_ALLOW_INSECURE_BIND": "maybe"})
    assert proc.returncode != 0 and execd is None and "not a boolean" in proc.stderr


def test_explicit_host_is_left_to_the_server(run, auth_file):
    proc, execd = run({"PROMPTSERVE_HOST": "127.0.0.1", "PROMPTSERVE_ALLOW_INSECURE_BIND": "0"})
    assert proc.returncode == 0 and execd["env"]["PROMPTSERVE_HOST"] == "127.0.0.1"
    proc, execd = run({"PROMPTSERVE_HOST": "10.1.2.3", "PROMPTSERVE_AUTH_FILE": str(auth_file)})
    assert proc.returncode == 0 and execd["env"]["PROMPTSERVE_HOST"] == "10.1.2.3"


def test_empty_variables_are_unset_not_empty_paths(run):
    proc, execd = run({"PROMPTSERVE_AUTH_FILE": "", "PROMPTSERVE_MODEL": "", "PROMPTSERVE_ALLOW_INSECURE_BIND": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "PROMPTSERVE_AUTH_FILE" not in execd["env"] and "PROMPTSERVE_MODEL" not in execd["env"]


def test_options_go_to_the_server_and_commands_replace_it(run, auth_file, tmp_path):
    env = {"PROMPTSERVE_AUTH_FILE": str(auth_file)}
    proc, execd = run(env, "--max-batch-size", "8", "--port", "9000")
    assert proc.returncode == 0 and execd["argv"] == ["-m", "server", "--max-batch-size", "8", "--port", "9000"]
    proc, execd = run(env, "python", "-m", "training", "--help")
    assert proc.returncode == 0 and execd["argv"] == ["-m", "training", "--help"]
    assert "PROMPTSERVE_HOST" not in execd["env"], "another command runs untouched"


def test_plain_docker_run_with_the_image_defaults_serves_on_all_interfaces(run):
    """`docker run -p 8000:8000 IMAGE`: exactly the Dockerfile's ENV, nothing else set."""
    image_env = {k: v for k, v in dockerfile_env(parse_dockerfile()).items() if k.startswith("PROMPTSERVE_")}
    assert "PROMPTSERVE_HOST" not in image_env, "the entrypoint decides the host"
    proc, execd = run(image_env)
    assert proc.returncode == 0, proc.stderr
    assert execd["argv"] == ["-m", "server"]
    assert execd["env"]["PROMPTSERVE_HOST"] == "0.0.0.0"
    assert execd["env"]["PROMPTSERVE_STORE"] == "/data"
    assert "WITHOUT AUTHENTICATION" in proc.stderr, "the image's default opt-in must be loud"
