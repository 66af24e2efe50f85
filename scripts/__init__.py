"""The benchmarks and tools: none runs in CI (tests run small versions of some). Run each from the repository root
as `python -m scripts.NAME`, so that `scripts` is a package and no script edits sys.path; `scripts/bench/` is the
library the benchmark CLIs share, `scripts/common.py` what every script and the live-server tests share."""
