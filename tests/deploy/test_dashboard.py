"""deploy/grafana/dashboards/promptserve.json: valid JSON, queries only the server's metrics, covers what ops need."""

from __future__ import annotations

import json
import re

from ._helpers import DEPLOY, METRIC_LABELS, METRICS, metric_family, promql_series

DASHBOARD = DEPLOY / "grafana" / "dashboards" / "promptserve.json"


def _panels():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "promptserve" and dash["title"]
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert panels
    return dash, panels


def _exprs():
    return [t["expr"] for p in _panels()[1] for t in p["targets"]]


def test_panels_are_well_formed():
    dash, panels = _panels()
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels:
        assert p["type"] == "timeseries" and p["title"]
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0


def test_every_queried_metric_is_in_the_server_contract():
    used = set()
    for expr in _exprs():
        assert expr.count("(") == expr.count(")"), expr
        series = promql_series(expr)
        assert series, f"query reads no promptserve metric: {expr}"
        for s in series:
            used.add(metric_family(s))  # raises on unknown names and wrong suffixes (e.g. _bucket on a counter)
        # Labels used in `by (...)` exist on the metrics the expression reads.
        for group in re.findall(r"by \(([^)]*)\)", expr):
            for label in (g.strip() for g in group.split(",")):
                if label == "le":
                    assert any(s.endswith("_bucket") for s in series), expr
                    continue
                assert any(label in METRIC_LABELS.get(metric_family(s), set()) for s in series), (label, expr)
    assert used == set(METRICS), f"metrics without a panel: {sorted(set(METRICS) - used)}"


def test_required_views_exist():
    exprs = _exprs()
    joined = "\n".join(exprs)
    # throughput
    assert "rate(promptserve_requests_total" in joined and "rate(promptserve_generated_tokens_total" in joined
    # latency percentiles come from histogram buckets
    for hist in ("promptserve_request_duration_seconds", "promptserve_time_to_first_token_seconds",
                 "promptserve_time_per_output_token_seconds", "promptserve_queue_wait_seconds",
                 "promptserve_batch_size"):
        quantiles = {m for e in exprs if f"{hist}_bucket" in e
                     for m in re.findall(r"histogram_quantile\((0\.\d+)", e)}
        assert {"0.5", "0.95", "0.99"} <= quantiles, (hist, quantiles)
    # queue and the cache tiers
    assert "promptserve_waiting_requests" in joined and "promptserve_running_requests" in joined
    assert "sum by (tier)" in joined


def test_contract_metrics_are_what_the_server_registers():
    """The names queried above are the server's own: build its registry (no model needed) and compare types."""
    from server.metrics import Metrics

    tiers = {t: {"hits": 1, "misses": 1, "evictions": 0, "resident_bytes": 10} for t in ("disk", "host", "device")}
    registered = {}
    for fam in Metrics(tier_stats=lambda: tiers).registry.collect():
        exposed = fam.name + "_total" if fam.type == "counter" else fam.name  # how the text format names it
        registered[exposed] = fam
    for name, kind in METRICS.items():
        assert name in registered, f"the server does not export {name}"
        assert registered[name].type == kind, (name, registered[name].type, kind)
    tier_labels = {s.labels.get("tier") for s in registered["promptserve_prompt_cache_hits_total"].samples}
    assert tier_labels == {"disk", "host", "device"}
