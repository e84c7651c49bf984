"""PNG plots of one or several results files: latency percentiles and throughput/goodput vs load.

matplotlib is imported here only, and this module only when plotting. Several files on one
figure compare runs (prefix-aware vs round-robin, colocated vs disaggregated): one colour per
file, one line style per percentile. Loads sit at evenly spaced positions labelled with their
values, so a doubling sweep and `inf` both read well.
"""

from __future__ import annotations

from pathlib import Path

from baton.bench.results import point_value

_STYLES = {"p50": ("-", "o"), "p90": ("--", "s"), "p99": (":", "^")}
_LATENCIES = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E latency"))


def _x_axis(docs: list[dict]) -> tuple[dict[float, int], str]:
    values = sorted({point_value(p) for d in docs for p in d["points"]})
    modes = {p["mode"] for d in docs for p in d["points"]}
    name = {"rate": "request rate (req/s)", "concurrency": "concurrency"}
    return {v: i for i, v in enumerate(values)}, name[modes.pop()] if len(modes) == 1 else "load"


def plot(docs: list[dict], out_dir: str | Path) -> list[Path]:
    """Write latency.png and throughput.png into out_dir; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pos, xlabel = _x_axis(docs)
    ticks = sorted(pos, key=pos.get)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    def series(doc, key):
        pts = sorted(doc["points"], key=point_value)
        return [pos[point_value(p)] for p in pts], [key(p["summary"]) for p in pts]

    def axes_setup(ax, title, ylabel):
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_xticks(range(len(ticks)), [f"{v:g}" for v in ticks])
        ax.grid(True, alpha=0.3)

    fig, axs = plt.subplots(2, 2, figsize=(12, 8))
    for ax, (key, title) in zip(axs.flat, _LATENCIES):
        for i, doc in enumerate(docs):
            for q, (style, marker) in _STYLES.items():
                xs, ys = series(doc, lambda s, key=key, q=q: s[key][q])
                ax.plot(xs, _nan(ys), style, marker=marker, color=colors[i % len(colors)],
                        label=f"{doc['label']} {q}")
        axes_setup(ax, title, "ms")
    axs.flat[0].legend(fontsize="small")
    fig.tight_layout()
    paths = [out / "latency.png"]
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)

    fig, axs = plt.subplots(1, 3, figsize=(15, 4.5))
    for i, doc in enumerate(docs):
        c = colors[i % len(colors)]
        xs, ys = series(doc, lambda s: s["request_throughput"])
        axs[0].plot(xs, ys, "-", marker="o", color=c, label=f"{doc['label']} throughput")
        xs, ys = series(doc, lambda s: s["goodput"])
        if any(y is not None for y in ys):
            axs[0].plot(xs, _nan(ys), "--", marker="s", color=c, label=f"{doc['label']} goodput")
        xs, ys = series(doc, lambda s: s["output_throughput"])
        axs[1].plot(xs, ys, "-", marker="o", color=c, label=doc["label"])
        xs, ys = series(doc, lambda s: s["prefix_cache_hit_rate"])
        axs[2].plot(xs, _nan([None if y is None else 100 * y for y in ys]), "-", marker="o", color=c,
                    label=doc["label"])
    slo = _slo_text(docs)
    axes_setup(axs[0], "requests/s and goodput" + (f"\n(SLO {slo})" if slo else ""), "req/s")
    axes_setup(axs[1], "output tokens/s", "tok/s")
    axes_setup(axs[2], "prefix-cache hit rate", "% of prompt tokens")
    for ax in axs:
        ax.legend(fontsize="small")
    fig.tight_layout()
    paths.append(out / "throughput.png")
    fig.savefig(paths[1], dpi=100)
    plt.close(fig)
    return paths


def _nan(ys):
    return [float("nan") if y is None else y for y in ys]


def _slo_text(docs: list[dict]) -> str:
    s = docs[0]["points"][0]["summary"] if docs and docs[0]["points"] else {}
    parts = [f"TTFT<={s['slo_ttft_ms']:g}ms" if s.get("slo_ttft_ms") is not None else "",
             f"TPOT<={s['slo_tpot_ms']:g}ms" if s.get("slo_tpot_ms") is not None else ""]
    return " ".join(p for p in parts if p)
