"""Fuzz every endpoint of a live promptserve with schemathesis (hypothesis) from its own /openapi.json.

    python -m scripts.fuzz_api                       # starts `python -m server` on loopback, ~1,500 requests
    python -m scripts.fuzz_api --examples 60         # more per operation and mode
    python -m scripts.fuzz_api --url http://127.0.0.1:8000 --key KEY   # an already running server

For every operation in the spec it generates requests in two modes (positive: bodies the schema accepts; negative:
bodies and parameters that break it) and, for operations with a task in the path, a third round aimed at real tasks
(a hard generate task, a classify task, a prompt-tuning task) so the engine paths are reached, not only 404s.
Every request carries an `Authorization: Bearer` header. Each response is checked:

- 5xx: any status >= 500 except a documented 503 (backpressure / draining) counts as a server error;
- schema: schemathesis' `response_schema_conformance` and `content_type_conformance` checks, plus our own rule that
  every 4xx/5xx JSON body is exactly `{"error": {"type": str, "message": str}}`;
- undocumented status: a status the spec does not list for that operation (reported, not a failure by itself).

Prints a table per operation and a summary; exits 1 if any 5xx or schema violation was seen.
`run_fuzz()` is imported by tests/reliability/test_fuzz.py for the small CI version.
"""

from __future__ import annotations

import argparse
import collections
import json
import signal
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from scripts.common import ServerProcess, artifact_zip, write_auth_file

KEY = "fuzz-key-0123456789abcdef"
TASKS = {"task_id": ["fz-qa", "fz-cls", "fz-soft"], "model": ["fz-qa", "fz-cls", "fz-soft"]}


@dataclass
class Finding:
    kind: str       # "5xx", "schema", "error_shape", "transport"
    operation: str
    status: int | None
    detail: str
    repro: str = ""


@dataclass
class Report:
    requests: int = 0
    by_status: collections.Counter = field(default_factory=collections.Counter)
    by_operation: dict = field(default_factory=lambda: collections.defaultdict(collections.Counter))
    findings: list[Finding] = field(default_factory=list)
    undocumented: collections.Counter = field(default_factory=collections.Counter)
    undocumented_example: dict = field(default_factory=dict)
    slowest: list = field(default_factory=list)  # (seconds, operation, status, curl) of the 5 slowest
    seconds: float = 0.0

    def count(self, kind: str) -> int:
        return sum(1 for f in self.findings if f.kind == kind)

    @property
    def server_errors(self) -> int:
        return self.count("5xx")

    @property
    def schema_violations(self) -> int:
        return self.count("schema") + self.count("error_shape")

    def summary(self) -> str:
        lines = [f"{'operation':<40} {'requests':>8}  statuses"]
        for op in sorted(self.by_operation):
            c = self.by_operation[op]
            lines.append(f"{op:<40} {sum(c.values()):>8}  " + " ".join(f"{s}:{n}" for s, n in sorted(c.items())))
        lines.append("")
        lines.append(f"requests: {self.requests} in {self.seconds:.0f} s; statuses: "
                     + " ".join(f"{s}:{n}" for s, n in sorted(self.by_status.items())))
        lines.append(f"5xx (other than 503): {self.server_errors}; schema violations: {self.count('schema')}; "
                     f"error-shape violations: {self.count('error_shape')}; transport errors: "
                     f"{self.count('transport')}")
        if self.undocumented:
            lines.append("statuses not listed in the spec (informational): "
                         + ", ".join(f"{op} -> {s} x{n}" for (op, s), n in sorted(self.undocumented.items())))
            for (op, s), body in sorted(self.undocumented_example.items()):
                lines.append(f"  e.g. {op} -> {s}: {body[:300]}")
        for sec, op, status, repro in sorted(self.slowest, reverse=True):
            lines.append(f"slow: {sec:.1f} s {op} -> {status}: {repro[:300]}")
        seen = set()
        for f in self.findings:
            sig = (f.kind, f.operation, f.status, f.detail[:120], f.repro if f.kind == "5xx" else "")
            if sig in seen:
                continue
            seen.add(sig)
            lines.append(f"  [{f.kind}] {f.operation} -> {f.status}: {f.detail[:400]}")
            if f.repro:
                lines.append(f"      {f.repro[:600]}")
        return "\n".join(lines)


def _header(resp, name: str) -> str:
    """schemathesis' Response keeps header values as lists."""
    value = resp.headers.get(name, "")
    return ",".join(value) if isinstance(value, (list, tuple)) else str(value)


def _error_shape_ok(resp) -> str | None:
    """None if the body is the one error shape; else what is wrong."""
    ctype = _header(resp, "content-type")
    if "json" not in ctype:
        return f"error body has content-type {ctype!r}, expected application/json"
    try:
        body = json.loads(resp.content)
    except ValueError:
        return "error body is not JSON"
    if not (isinstance(body, dict) and set(body) == {"error"} and isinstance(body["error"], dict)
            and set(body["error"]) == {"type", "message"} and isinstance(body["error"]["type"], str)
            and isinstance(body["error"]["message"], str) and body["error"]["message"]):
        return f"error body is not {{'error': {{'type', 'message'}}}}: {resp.content[:200]!r}"
    return None


def run_fuzz(base_url: str, key: str, examples: int = 25, seed: int | None = 0, modes=("positive", "negative"),
             targeted: bool = True, time_budget_s: float | None = None, verbose: bool = False,
             request_timeout_s: float = 300, only=None) -> Report:
    """Fuzz every operation of base_url's /openapi.json (or those whose label `only(label)` accepts); returns the
    counts (raises nothing on findings)."""
    import hypothesis
    import requests
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode
    from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

    warnings.filterwarnings("ignore")
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json", headers={"Authorization": f"Bearer {key}"})
    report = Report()
    session = requests.Session()
    headers = {"Authorization": f"Bearer {key}"}
    t0 = time.monotonic()
    documented: dict[str, set[int]] = {}
    for result in schema.get_all_operations():
        op = result.ok()
        documented[op.label] = {int(s) for s in op.definition.raw.get("responses", {}) if s.isdigit()}

    def one(case) -> None:
        label = case.operation.label
        repro = ""
        try:
            repro = case.as_curl_command(headers=headers)
        except Exception:  # noqa: BLE001
            pass
        started = time.monotonic()
        try:
            resp = case.call(base_url=base_url, session=session, headers=headers, timeout=request_timeout_s)
        except Exception as e:  # noqa: BLE001 - a dropped connection is a finding, not a crash of the fuzzer
            report.findings.append(Finding("transport", label, None, f"{type(e).__name__}: {e}", repro))
            return
        took = time.monotonic() - started
        report.slowest = sorted(report.slowest + [(took, label, resp.status_code, repro)], reverse=True)[:5]
        status = resp.status_code
        report.requests += 1
        report.by_status[status] += 1
        report.by_operation[label][status] += 1
        if status >= 500 and status != 503:
            report.findings.append(Finding("5xx", label, status, resp.text[:400], repro))
        if status >= 400:
            bad = _error_shape_ok(resp)
            if bad:
                report.findings.append(Finding("error_shape", label, status, bad, repro))
        if status not in documented.get(label, set()):
            report.undocumented[(label, status)] += 1
            report.undocumented_example.setdefault((label, status), f"{resp.text[:200]} <- {repro[:300]}")
        try:
            case.validate_response(resp, checks=[response_schema_conformance, content_type_conformance],
                                   headers=headers)
        except Exception as e:  # noqa: BLE001 - schemathesis raises a FailureGroup / CheckFailed
            text = str(e).strip().splitlines()
            detail = " | ".join(line for line in text[:6] if line.strip())
            if "text/event-stream" in _header(resp, "content-type") and "schema" in detail.lower():
                return  # SSE bodies are not JSON documents; the spec documents the JSON form only
            report.findings.append(Finding("schema", label, status, detail, repro))
        if verbose:
            print(f"{label} -> {status}", flush=True)

    budget_end = None if time_budget_s is None else t0 + time_budget_s
    plans = []
    for result in schema.get_all_operations():
        op = result.ok()
        if only is not None and not only(op.label):
            continue
        for mode in modes:
            plans.append((op, mode, None))
        if targeted:
            params = [p.name for p in op.path_parameters]
            if params and op.method.upper() != "DELETE":  # deleting the targets would turn the rest into 404s
                plans.append((op, "positive", params))
            elif op.path in ("/v1/completions", "/v1/chat/completions"):
                plans.append((op, "positive", "model"))  # the task is the body's `model`
    for op, mode, params in plans:
        if budget_end is not None and time.monotonic() > budget_end:
            break
        gm = GenerationMode.POSITIVE if mode == "positive" else GenerationMode.NEGATIVE
        if params == "model":
            def aim(pair):
                case, task = pair
                if isinstance(case.body, dict):
                    case.body["model"] = task
                return case
            strategy = st.tuples(op.as_strategy(generation_mode=gm), st.sampled_from(TASKS["model"])).map(aim)
        elif params:
            strategy = st.sampled_from(range(3)).flatmap(
                lambda i, op=op, params=params: op.as_strategy(
                    generation_mode=gm, path_parameters={p: TASKS.get(p, ["fz-qa"] * 3)[i] for p in params}))
        else:
            strategy = op.as_strategy(generation_mode=gm)

        @settings(max_examples=examples, deadline=None, database=None,
                  phases=[Phase.generate], suppress_health_check=list(HealthCheck),
                  verbosity=hypothesis.Verbosity.quiet)
        @given(case=strategy)
        def run(case) -> None:
            if budget_end is not None and time.monotonic() > budget_end:
                return
            one(case)

        if seed is not None:  # the same requests every run for one seed
            run = hypothesis.seed(seed)(run)
        try:
            run()
        except Exception as e:  # noqa: BLE001 - e.g. Unsatisfiable for a mode an operation cannot negate
            if verbose:
                print(f"{op.label} {mode}: generation stopped: {type(e).__name__}: {str(e)[:200]}", flush=True)
    report.seconds = time.monotonic() - t0
    return report


# ---- fixtures on the server under test

def soft_prompt_zip(T: int = 4, seed: int = 0, labels: list[dict] | None = None) -> bytes:
    """A native prompt-tuning artifact for the default model, zipped (random small tensors)."""
    import torch

    from prompt_core.spec import PromptTensors
    from prompt_store.format import TaskManifest

    g = torch.Generator().manual_seed(seed)
    tensors = PromptTensors(virtual=torch.randn(T, 576, generator=g) * 0.05)
    manifest = TaskManifest(id="artifact", version=1, tenant="", visibility="private", kind="prompt_tuning",
                            num_virtual_tokens=T, template="{input}", labels=labels or [],
                            task_type="classify" if labels else "generate")
    return artifact_zip(manifest, tensors)


def seed_tasks(base_url: str, key: str) -> None:
    import httpx
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as c:
        r = c.post("/v1/tasks", json={"task_id": "fz-qa", "kind": "hard", "template": "Q: {input}\nA:"})
        assert r.status_code == 201, r.text
        r = c.post("/v1/tasks", json={"task_id": "fz-cls", "kind": "hard", "template": "Review: {input}\nSentiment:",
                                      "labels": ["positive", "negative"]})
        assert r.status_code == 201, r.text
        r = c.post("/v1/tasks", data={"task_id": "fz-soft"},
                   files={"adapter": ("a.zip", soft_prompt_zip(), "application/zip")})
        assert r.status_code == 201, r.text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="fuzz this running server instead of starting one")
    ap.add_argument("--key", default=KEY, help="bearer key for --url")
    ap.add_argument("--examples", type=int, default=45, help="generated requests per operation and mode")
    ap.add_argument("--seed", type=int, default=None, help="derandomize (same requests every run)")
    ap.add_argument("--time-budget", type=float, default=None, help="stop generating after this many seconds")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops the server we started
    server = None
    tmp = tempfile.TemporaryDirectory(prefix="fuzz-")
    try:
        if args.url:
            url, key = args.url.rstrip("/"), args.key
        else:
            # modest limits keep 1,000+ requests in minutes on a CPU (64 = the default max_new_tokens, so requests
            # that leave it out are served); larger values are 413s, still fuzzed
            auth = write_auth_file(Path(tmp.name) / "auth.json", {KEY: "fuzz"})
            server = ServerProcess(Path(tmp.name) / "store", "--auth-file", str(auth), "--max-new-tokens", "64",
                                   "--max-input-tokens", "512")
            url, key = server.url, KEY
            seed_tasks(url, key)
        import schemathesis
        print(f"schemathesis {schemathesis.SCHEMATHESIS_VERSION}; fuzzing {url}", flush=True)
        report = run_fuzz(url, key, examples=args.examples, seed=args.seed, time_budget_s=args.time_budget,
                          verbose=args.verbose)
        print(report.summary())
        if server is not None:
            if server.errors:
                print("server log: ERROR/Traceback lines, e.g.:\n" + "".join(server.errors[:10]))
        return 1 if report.server_errors or report.schema_violations or report.count("transport") else 0
    finally:
        if server is not None:
            server.close(grace_s=30)
        tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
