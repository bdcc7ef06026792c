"""A bench report as a terminal table and as a PNG chart."""

from __future__ import annotations

from pathlib import Path

from gptkiln.errors import UsageError


def summary(report: dict) -> str:
    from gptkiln.summary import text_table

    machine, settings = report["machine"], report["settings"]
    bandwidth = machine["bandwidth"]
    context = settings["prompt_tokens"] + settings["new_tokens"] // 2
    return (f"model      {report['model']['name']} ({report['spec']['model_type']}, "
            f"{report['spec']['num_layers']} layers)\n"
            f"machine    {machine['cpu']}, {machine['cores']} cores, {machine['threads']} threads\n"
            f"bandwidth  {bandwidth['gb_per_s']:.1f} GB/s ({bandwidth['kernel']}, measured in this run)\n"
            f"run        batch 1 prefill of {settings['prompt_tokens']} tokens; {settings['new_tokens']} new tokens "
            f"per decode; median of {settings['repeats']} after {settings['warmup']} warm-up\n"
            f"floor      bytes a decode step reads (weights + KV cache at {context} tokens) / bandwidth\n\n"
            + text_table(table(report)) + _cache_note(report, machine.get("last_level_cache_mb")))


def table(report: dict) -> list[tuple]:
    """The header row, then one row per variant (the terminal table; benchmarks/ prints it as Markdown)."""
    batches = [str(b) for b in report["settings"]["batches"]]
    header = ["variant", "precision", "size MB", "peak RSS MB", "prefill b1 ms", "TTFT ms"]
    for batch in batches:
        header += [f"decode b{batch} tok/s (min-max)", "vs eager", "% floor"]
    rows = [tuple(header)]
    cache = report["machine"].get("last_level_cache_mb")
    for row in report["results"]:
        cells = [row["name"], row["precision"], f"{row['artifact_mb']:.1f}" if row["artifact_mb"] else "-",
                 f"{row['peak_rss_mb']:.0f}", _ms(row["prefill_ms"]), _ms(row["ttft_ms"])]
        for batch in batches:
            decode = row["decode"][batch]
            rate = decode["tokens_per_s"]
            cached = cache and row["weight_mb_per_step"] < cache
            cells += [f"{rate['median']:.1f} ({rate['min']:.1f}-{rate['max']:.1f})", f"{decode['vs_pytorch']:.2f}x",
                      f"{decode['floor_pct']:.0f}%" + ("*" if cached else "")]
        rows.append(tuple(cells))
    return rows


def _cache_note(report: dict, cache: float | None) -> str:
    if not cache or all(row["weight_mb_per_step"] >= cache for row in report["results"]):
        return ""
    return (f"\n* the weights fit in the {cache:.0f} MB last-level cache: this floor is not a bound "
            "(decode can beat it)")


def _ms(values: dict) -> str:
    return f"{values['median']:.1f}"


def pyplot():
    """matplotlib's pyplot, drawing to files; a clear error where it is not installed (checked before any work)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("the chart needs matplotlib", "pip install 'gptkiln[bench]', or pass --no-chart") from None
    return plt


def chart(report: dict, path: Path) -> None:
    """Decode tokens/s and prefill / TTFT latency per variant, PyTorch eager as the baseline line."""
    plt = pyplot()
    rows = report["results"]
    labels = [f"{row['name']}\n{row['precision']}" for row in rows]
    batches = [str(b) for b in report["settings"]["batches"]]
    eager = rows[0]
    figure, (rate_axes, latency_axes) = plt.subplots(2, 1, figsize=(max(8, 0.7 * len(rows) + 3), 10))
    width = 0.8 / len(batches)
    for index, batch in enumerate(batches):
        color = f"C{index}"
        medians = [row["decode"][batch]["tokens_per_s"]["median"] for row in rows]
        errors = [[m - row["decode"][batch]["tokens_per_s"]["min"] for m, row in zip(medians, rows)],
                  [row["decode"][batch]["tokens_per_s"]["max"] - m for m, row in zip(medians, rows)]]
        rate_axes.bar([i + (index - (len(batches) - 1) / 2) * width for i in range(len(rows))], medians, width,
                      yerr=errors, color=color, label=f"batch {batch}")
        rate_axes.axhline(eager["decode"][batch]["tokens_per_s"]["median"], color=color, linestyle="--",
                          linewidth=1, label=f"PyTorch eager, batch {batch}")
    rate_axes.set_title(f"decode tokens/s ({report['settings']['new_tokens']} new tokens)")
    for index, (key, name) in enumerate((("prefill_ms", "prefill"), ("ttft_ms", "time to first token"))):
        rate = [row[key]["median"] for row in rows]
        latency_axes.bar([i + (index - 0.5) * 0.4 for i in range(len(rows))], rate, 0.4, color=f"C{index + 2}",
                         label=f"{name} (batch 1, {report['settings']['prompt_tokens']} tokens)")
    latency_axes.axhline(eager["prefill_ms"]["median"], color="C2", linestyle="--", linewidth=1,
                         label="PyTorch eager prefill")
    latency_axes.set_title("latency, ms (lower is better)")
    for axes in (rate_axes, latency_axes):
        axes.set_xticks(range(len(rows)), labels, fontsize=8, rotation=30, ha="right")
        axes.legend(fontsize=8)
        axes.grid(axis="y", alpha=0.3)
    machine = report["machine"]
    figure.suptitle(f"{report['model']['name']} on {machine['cpu']}, {machine['threads']} threads")
    figure.tight_layout()
    partial = path.with_name(f".{path.name}.partial.png")
    figure.savefig(partial, dpi=110)
    plt.close(figure)
    partial.replace(path)


if __name__ == "__main__":  # redraw a chart: python -m gptkiln.bench.report benchmark.json chart.png
    import json
    import sys

    chart(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]))
