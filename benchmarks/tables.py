"""Markdown tables, the form benchmarks/RESULTS.md holds: one header row, one row per variant."""


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = [headers, ["---"] * len(headers), *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)
