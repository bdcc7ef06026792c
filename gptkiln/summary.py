"""The summary table of a build (what `gptkiln export` and `verify` print), and the plain-text table it is made of."""

from __future__ import annotations

import re
from collections import Counter


def build_summary(result) -> str:
    compiled = [t for t in result.targets if t.compiled]
    rows = _quantized_rows(result, compiled) if result.precision.quantized else _parity_rows(result, compiled)
    stages = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in result.stage_seconds.items())
    fusions = [f"fusion  {t.name}: {_fusion_line(t.settings['fusion'])}" for t in result.targets]
    quantized = [f"quant   {_quant_line(result.quantization)}"] if result.quantization else []
    prepared = [_prepared_lines(t) for t in result.targets if not t.compiled]
    return (f"model   {_model_line(result.model, result.spec)}\n"
            f"output  {result.output}\nstages  {stages}\n" + "\n".join(quantized + fusions) + "\n\n"
            + (text_table(rows) if compiled else "") + "".join(prepared))


def _model_line(model: dict, spec) -> str:
    line = f"{model['name']} ({spec.family}, {spec.num_layers} layers)"
    if "gguf" in model:
        types = ", ".join(f"{count} {kind}" for kind, count in model["gguf"]["tensor_types"].items())
        line += f"\n        from GGUF, dequantized to float32 (tensors stored as {types})"
    if not spec.tested:
        line += (f"\n        note: '{spec.model_type}' is not among the families gptkiln's suite tests; "
                 "the parity gate below is what proves this build")
    return line


def text_table(rows: list[tuple]) -> str:
    """Columns padded to their widest cell, a rule under the header row."""
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _prepared_lines(target) -> str:
    settings = target.settings
    readiness = settings["readiness"]
    return (f"\n\n{target.name}: prepared, NOT compiled (no engine, no parity run here)\n"
            f"  readiness: ready for TensorRT {readiness['minimum_tensorrt']}+ "
            f"({len(readiness['warnings'])} warning(s)); the ONNX is in {target.name}/\n"
            "  missing here: " + "; ".join(settings["missing"]) + "\n"
            "  to finish: run the same gptkiln export on a machine that has them (builds, then proves parity),\n"
            f"  or build the engine alone there with trtexec: sh {target.name}/{settings['trtexec_script']}")


def _quantized_rows(result, targets) -> list[tuple]:
    rows = [("target", "precision", "perplexity fp32 -> ours", "increase", "top-1 vs fp32",
             "batch row top-1: other rows changed", "alone", "engine MB", "bits/weight", "result")]
    for target in targets:
        accuracy = target.accuracy
        rows.append((target.name, result.precision.value, f"{accuracy.ppl_reference:.3f} -> {accuracy.ppl:.3f}",
                     f"{accuracy.ppl_increase_pct:+.2f}%", f"{accuracy.top1_agreement:.1%}",
                     _worst_top1(target, "other_rows"), _worst_top1(target, "batch_vs_alone"),
                     _megabytes(target.settings.get("engine_bytes")),
                     target.settings.get("bits_per_weight", "-"), "PASS" if not target.failures else "FAIL"))
    return rows


def _worst_top1(target, kind: str) -> str:
    values = [c.top1_agreement for c in target.parity.comparisons if c.name.startswith(kind)]
    return f"{min(values):.1%}" if values else "-"  # other_rows: absent from earlier manifests


def _megabytes(size: int | None) -> str:
    return f"{size / 1e6:.1f}" if size else "-"  # absent from earlier manifests


def _compact(names: list[str]) -> list[str]:
    """Layer names that differ only in one number as one: model.layers.{1,4,12}.mlp.down_proj.weight."""
    numbers: dict[tuple[str, str], list[str]] = {}
    for name in names:
        match = re.fullmatch(r"(.*?\.)(\d+)(\..*)", name)
        key = (match.group(1), match.group(3)) if match else (name, "")
        numbers.setdefault(key, []).append(match.group(2) if match else "")
    return [f"{head}{{{','.join(found)}}}{tail}" if len(found) > 1 else f"{head}{found[0]}{tail}"
            for (head, tail), found in numbers.items()]


def _quant_line(quantization: dict) -> str:
    kept = ", ".join(_compact(quantization.get("kept", quantization.get("kept_fp32", [])))) or "none"  # fp32: old
    kept_precision = quantization.get("kept_precision", "fp32")
    smoothed = len(quantization["smoothing"])
    alphas = sorted({s["alpha"] for s in quantization["smoothing"] if "alpha" in s})  # absent from earlier manifests
    searched = f" (α searched: {alphas[0]:g} to {alphas[-1]:g})" if len(alphas) > 1 else ""
    scaled = sum(1 for s in quantization.get("scaling", []) if s["alpha"] > 0)  # absent from earlier manifests
    floating = quantization.get("float_channels", {})  # absent from earlier manifests
    method = quantization["method"]
    details = ", ".join(f"{k} {v}" for k, v in method.items() if v is not None)  # None: not applied (no calibration)
    narrowed = Counter(quantization.get("narrowed_blocks", {}).values())  # absent from earlier builds' manifests
    tables = Counter((quantization.get("lookup_tables") or {}).values())  # absent from earlier manifests
    bits = quantization.get("bits_per_weight") or {}
    bits_line = "".join(f"; {value:.2f} bits per weight ({where.replace('_', ' ')}, graph)"
                        for where, value in bits.items() if value is not None)
    return (f"{quantization['layers_quantized']}/{quantization['layers_total']} linear layers quantized "
            f"({details}); kept in {kept_precision}: {kept}"
            + (f"; SmoothQuant on {smoothed} activations{searched}" if smoothed else "")
            + (f"; AWQ scales on {scaled} activations" if scaled else "")
            + (f"; {sum(map(len, floating.values()))} channels of {len(floating)} activations in float" if floating else "")
            + "".join(f"; {n} layers in blocks of {block} (their input size)" for block, n in sorted(narrowed.items()))
            + "".join(f"; {n} lookup table(s) in {width} bits" for width, n in sorted(tables.items()))
            + bits_line)


def _parity_rows(result, targets) -> list[tuple]:
    rows = [("target", "precision", "logits rel (b1)", "padded rel", "pad vs unpad", "top-1", "greedy", "result")]
    for target in targets:
        by_name = {c.name: c for c in target.parity.comparisons}
        unpadded = max((c.rel for c in target.parity.comparisons if c.name.startswith("padded_vs")), default=0.0)
        greedy = " ".join(f"{g.matched}/{g.tokens}" for g in target.parity.greedy)
        rows.append((target.name, result.precision.value, f"{by_name['batch1/logits'].rel:.2e}",
                     f"{by_name['padded/logits'].rel:.2e}", f"{unpadded:.2e}", f"{by_name['batch1/logits'].top1_agreement:.1%}", greedy,
                     "PASS" if not target.failures else "FAIL"))
    return rows


def _fusion_line(fusion: dict) -> str:
    counts = ", ".join(f"{c['name']} {c['actual']}" + (f"/{c['expected']}" if c["expected"] is not None else "")
                       for c in fusion["fusions"])
    return f"{counts}; nodes {fusion['nodes_before']} -> {fusion['nodes_after']}"


def compress_summary(result) -> str:
    """What `gptkiln compress` prints: what was removed, the size, the distillation and the gate."""
    record = result.record
    removed = record["removed"]
    parts = [f"blocks {removed['blocks']}" if removed["blocks"] else None,
             f"{removed['mlp_channels']['per_block']} of {removed['mlp_channels']['of']} MLP channels per block"
             if "mlp_channels" in removed else None,
             f"KV groups {removed['kv_groups']}" if "kv_groups" in removed else None,
             f"{removed['sparsity']['pattern']} sparsity ({removed['sparsity']['score']}): "
             f"{removed['sparsity']['zeroed'] / 1e6:.2f}M weights zeroed in {removed['sparsity']['layers']} layers "
             "(sparse on TensorRT, dense on CPU targets)" if "sparsity" in removed else None]
    before, after = record["parameters"]["original"], record["parameters"]["compressed"]
    gate = record["gate"]
    lines = [f"output     {result.output}",
             f"removed    {'; '.join(p for p in parts if p)}",
             f"parameters {before / 1e6:.2f}M -> {after / 1e6:.2f}M ({100 * (after / before - 1):+.1f}%"
             f"{', %.2fM of them zero' % (removed['sparsity']['zeroed'] / 1e6) if 'sparsity' in removed else ''})"]
    distilled = record["distillation"]
    if distilled:
        lines.append(f"distilled  {distilled['steps']} steps on {distilled['device']}, loss {distilled['loss_first']:.4f} "
                     f"-> {distilled['loss_last']:.4f} (means of the first and last 10), {distilled['seconds']:.0f}s; "
                     f"curve: {distilled['loss_curve']}")
    lines.append(f"gate       perplexity {gate['ppl_reference']:.3f} -> {gate['ppl']:.3f} ({gate['ppl_increase_pct']:+.2f}%, "
                 f"limit +{gate['max_ppl_increase_pct']:g}%), top-1 vs the original {gate['top1_agreement']:.1%}: PASS")
    return "\n".join(lines)
