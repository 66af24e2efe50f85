"""docs/benchmarks.md is generated: rendering its stored runs again (the command the page records, the decode-speed
runs kept in docs/img/raw, the notes written by hand) gives the page as committed, so no part of it is lost on the
next regeneration."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from scripts import bench_report as B
from scripts.bench import decode_page, front_page

ROOT = Path(__file__).resolve().parents[1]


def test_the_benchmarks_page_is_what_bench_report_renders_from_its_stored_runs():
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    command = re.search(r"Rendered \(with the extra runs below\) by `(python -m scripts\.bench_report [^`]+)`", page)
    argv = shlex.split(command.group(1))[3:]
    opts = {flag: [v for f, v in zip(argv, argv[1:]) if f == flag] for flag in set(argv[::2])}
    res = json.loads((ROOT / opts["--from-json"][0]).read_text())
    res["render_command"] = command.group(1)
    imgs = {name: f"img/{name}" for name in ("bench_batch.png", "bench_tasks.png", "bench_virtual.png",
                                             "bench_latency.png")}
    latency = B.latency_runs(sorted(ROOT.glob(B.LATENCY_RUNS)))
    assert latency, "the decode-speed runs that open the page are stored"
    imgs["latency_plot"] = str(Path(latency[0]["args"]["plot"]).relative_to("docs"))
    rendered = B.render(res, imgs, B.kept(page, B.NOTES_BEGIN, B.NOTES_END),
                        json.loads((ROOT / opts["--http-json"][0]).read_text()), None,
                        [json.loads((ROOT / p).read_text()) for p in opts["--engine-json"]], latency,
                        B.kept(page, B.DECODE_NOTES_BEGIN, B.DECODE_NOTES_END), front_page.load(ROOT))
    assert rendered == page


def test_decode_goals_one_row_per_goal_and_per_batch_goals_share_one():
    run = {"args": {"dtype": "float32"}, "weight_bytes": 500e6, "read_bytes_per_s": 25e9, "bound_tokens_per_s": 50.0,
           "goals": [{"name": "batch 1 vs bandwidth bound", "ratio": 0.4, "target": 0.5},
                     {"name": "HTTP vs in-process, batch 1", "ratio": 1.0, "target": 0.9},
                     {"name": "HTTP vs in-process, batch 64", "ratio": 0.8, "target": 0.9}]}
    assert decode_page.decode_goals(run) == [
        ("batch 1 vs bandwidth bound", 0.5, "0.40",
         "not met: read bandwidth 25.0 GB/s (one pass over 512 MiB) / 500 MB of float32 weights = 50.0 tokens/s"),
        ("HTTP vs in-process, batch 1 / 64", 0.9, "1.00 / 0.80", "not met"),  # met only when every batch is
    ]
