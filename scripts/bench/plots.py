"""The report's plots (docs/img/bench_*.png) from one run's numbers: throughput against batch size, distinct tasks
and virtual tokens, and latency percentiles per system."""

from __future__ import annotations

from pathlib import Path


def plots(res: dict, img: Path) -> dict[str, str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img.mkdir(parents=True, exist_ok=True)
    out = {}
    bound = res["bound"]["tok_per_s"]

    def save(fig, name):
        path = img / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        out[name] = f"img/{name}"

    sb = res["sweep_batch"]
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [d["batch"] for d in sb]
    ax.plot(xs, [d["engine"]["tok_per_s"] for d in sb], "o-", label="engine (mixed tasks), end to end")
    ax.plot(xs, [d["engine"]["decode_tok_per_s"] for d in sb], "o--", label="engine, decode steps only")
    ax.plot(xs, [d["hf"]["tok_per_s"] for d in sb], "s-", label="HF generate, no prompts")
    ax.axhline(bound, color="gray", ls=":", label=f"compute bound {bound:.0f}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size (requests)")
    ax.set_ylabel("output tokens/s")
    ax.set_title("Throughput vs batch size")
    ax.legend(fontsize=8)
    save(fig, "bench_batch.png")

    st = res["sweep_tasks"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([d["tasks"] for d in st], [d["engine"]["tok_per_s"] for d in st], "o-")
    ax.set_xscale("log", base=2)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("distinct tasks over the requests")
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"Throughput vs distinct tasks ({st[0]['requests']} requests)")
    save(fig, "bench_tasks.png")

    sv = res["sweep_virtual"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([d["virtual_tokens"] for d in sv], [d["engine"]["tok_per_s"] for d in sv], "o-", label="tokens/s")
    ax.set_xlabel("virtual tokens per prompt (0 = hard prompts)")
    ax.set_ylabel("output tokens/s")
    ax.set_ylim(bottom=0)
    ax2 = ax.twinx()
    ax2.plot([d["virtual_tokens"] for d in sv], [1000 * d["engine"]["ttft_p50"] for d in sv], "s--", color="C1",
             label="TTFT p50 (ms)")
    ax2.set_ylabel("TTFT p50 (ms)")
    ax.set_title("Throughput vs virtual-token count")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="center right", fontsize=8)
    save(fig, "bench_virtual.png")

    r = res["results"]
    names = list(r)
    fig, ax = plt.subplots(figsize=(7, 4))
    w = 0.2
    for i, (key, label) in enumerate([("ttft_p50", "TTFT p50"), ("lat_p50", "latency p50"),
                                      ("lat_p95", "latency p95"), ("lat_p99", "latency p99")]):
        ax.bar([j + (i - 1.5) * w for j in range(len(names))], [r[n][key] for n in names], w, label=label)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, fontsize=8)
    ax.set_ylabel("seconds")
    ax.set_title("Latency (all requests arrive at once; PEFT: service time per request)")
    ax.legend(fontsize=8)
    save(fig, "bench_latency.png")
    return out
