"""The engine benchmarks' library; the CLIs on top are scripts/bench_engine.py, bench_report.py, bench_latency.py
and bench_http.py.

    inputs.py       the fixed input texts and classification labels (no torch: the HTTP load generator uses them)
    workload.py     tasks of every prompt kind, requests, the engine run that times them (Result, StepTimer)
    baselines.py    HF generate, PEFT one request at a time, and the compute and bandwidth bounds
    environment.py  what a run records about the machine and the commit; warnings off; device sync
    profile.py      torch.profiler over whole engine steps, through the engine's public API only
    standard.py     the standard workload against every baseline, tasks in flight, classify vs generate, verdicts
    sweeps.py       what bench_report.py measures beyond the standard workload (batch, tasks, virtual tokens)
    plots.py        the report's plots; page.py its markdown; decode_page.py the decode-speed sweep's markdown
"""
