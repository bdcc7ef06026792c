"""A build file (kiln.yaml or kiln.toml): models x precisions, each built for its targets.

    output: out/release          # root; each build goes to <output>/<model>/<precision>
    models: [reference]          # names as `gptkiln export` takes them
    precisions: [fp32, int4]     # default [fp32]
    targets: [onnxruntime, openvino]   # default: every installed target that runs the precision
    jobs: 2                      # builds run in parallel (default 1)
    options:                     # any `gptkiln export` option, by its long name
      int4-method: rtn
      calibration: data/calibration.txt
    target_options:              # per target: threads, performance-hint, inference-precision, kv-cache-precision,
                                 # dynamic-quantization-group
      openvino: {threads: 2}
    compress:                    # checkpoints made (`gptkiln compress`) before the builds, at <output>/<name>/checkpoint;
      reference-mlp25:           # a name `models` can list
        model: reference         # what it compresses; every other key a long option of `gptkiln compress`
        calibration: data/calibration.txt
        prune-mlp: 0.25
        distill-steps: 200

The file's keys and types are checked before anything is built; a mistake names the key and
its line. Relative paths (output, local models, calibration, eval text) are relative to the
file. A listed target that cannot run a precision is skipped for it, and the plan says so.
Every `compress` entry runs first, one at a time (a checkpoint whose compression.json holds the same request
key is reused); the builds of a model whose compression fails fail with its error.
"""

from __future__ import annotations

import argparse
import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from gptkiln.compression.settings import CompressSettings, compress_settings
from gptkiln.config import BuildConfig, Precision
from gptkiln.errors import ConfigError, UsageError

TOP_LEVEL = {"output": str, "models": list, "precisions": list, "targets": list, "jobs": int, "options": dict,
             "target_options": dict, "compress": dict}
CHECKPOINT = "checkpoint"  # <output>/<compress name>/checkpoint
NOT_IN_COMPRESS = {"output", "force", "json", "handler"}  # the file decides where a checkpoint goes
STRUCTURAL = {"model", "output", "targets", "quantize", "force", "json", "handler"}  # set by the file's own keys
# RuntimeSettings (trt_*: under options)
TARGET_OPTIONS = {"threads", "performance_hint", "inference_precision", "kv_cache_precision",
                  "dynamic_quantization_group"}
PATH_OPTIONS = {"calibration", "eval_text"}


@dataclass
class Compression:
    name: str  # a model name the file's `models` can list
    settings: CompressSettings


@dataclass
class MatrixBuild:
    name: str  # "<model>/<precision>"
    config: BuildConfig
    skipped: list[str] = field(default_factory=list)  # listed targets that cannot run this precision
    compression: str | None = None  # the `compress` entry whose checkpoint this build exports


@dataclass
class BuildFile:
    path: Path
    builds: list[MatrixBuild]
    jobs: int
    compressions: list[Compression] = field(default_factory=list)


def read_build_file(path: Path) -> BuildFile:
    from gptkiln.options import export_options

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"build file '{path}' does not exist", "give the path of a kiln.yaml or kiln.toml")
    data, lines = _parse(path)
    where = _Locator(path, lines)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the file must be a mapping of keys (output, models, ...)", "see the README example")
    for key, value in data.items():
        if key not in TOP_LEVEL:
            raise ConfigError(f"{where(key)}: unknown key '{key}'", f"use one of: {', '.join(TOP_LEVEL)}")
        _expect(where, (key,), value, TOP_LEVEL[key])
    for key in ("output", "models"):
        if key not in data:
            raise ConfigError(f"{path}: the key '{key}' is missing", f"add '{key}:' to the file")
    base = path.resolve().parent
    actions = export_options()
    options = _options(where, ("options",), data.get("options", {}), actions, base)
    jobs = data.get("jobs", 1)
    if jobs < 1:
        raise ConfigError(f"{where('jobs')}: jobs must be >= 1, got {jobs}", "set jobs to a positive count")
    precisions = [_choice(where, ("precisions", i), p, [p.value for p in Precision])
                  for i, p in enumerate(data.get("precisions", ["fp32"]))]
    targets = [_choice(where, ("targets", i), t, list(_target_names())) for i, t in enumerate(data.get("targets", []))]
    overrides = _target_options(where, data.get("target_options", {}), actions, targets)
    models = [_expect(where, ("models", i), m, str) for i, m in enumerate(data["models"])]
    root = (base / data["output"]).resolve()
    compressions = {name: _compression(where, name, entry, base, root)
                    for name, entry in data.get("compress", {}).items()}
    for name in compressions:
        if name not in models:
            raise ConfigError(f"{where('compress', name)}: compress entry '{name}' is not listed in models",
                              f"add {name} to models (its builds export the checkpoint), or remove the entry")
    builds = []
    for model in models:
        compression = compressions.get(model)
        model_arg = str(compression.settings.output) if compression else _model_arg(model, base)
        for precision in precisions:
            build = _matrix_build(where, model, model_arg, precision, targets, options, overrides, root)
            builds.append(replace(build, compression=compression.name if compression else None))
    return BuildFile(path, builds, jobs, list(compressions.values()))


def _model_arg(model: str, base: Path) -> str:
    """A local model relative to the file; anything else as written."""
    local = (base / model).expanduser()
    return str(local) if not model.startswith("preset:") and local.exists() else model


def _compression(where, name: str, entry, base: Path, root: Path) -> Compression:
    from gptkiln.options import compress_options

    key = ("compress", name)
    _expect(where, key, entry, dict)
    if _slug(name) != name:
        raise ConfigError(f"{where(*key)}: compress name '{name}' is not a plain directory name",
                          f"use letters, digits, '.', '_' and '-', e.g. {_slug(name)}")
    for required in ("model", "calibration"):
        if required not in entry:
            raise ConfigError(f"{where(*key)}: compress entry '{name}' has no '{required}'",
                              f"add '{required}:' (what to compress, and the text to measure and distil on)")
    model = _model_arg(_expect(where, (*key, "model"), entry["model"], str), base)
    values = _options(where, key, {k: v for k, v in entry.items() if k != "model"}, compress_options(), base,
                      "compress", NOT_IN_COMPRESS, "the checkpoint goes to <output>/<name>/checkpoint")
    calibration = values.pop("calibration")
    try:
        settings = compress_settings(model, root / name / CHECKPOINT, calibration, **values)
        settings.check()
    except UsageError as error:
        raise ConfigError(f"{where(*key)}: compress entry '{name}': {error.cause}", error.fix) from None
    return Compression(name, settings)


def _matrix_build(where, model: str, model_arg: str, precision: str, targets: list[str], options: dict,
                  overrides: dict, root: Path) -> MatrixBuild:
    from gptkiln.options import export_config
    from gptkiln.targets import TARGETS, available_targets

    listed = targets or available_targets()
    able = [t for t in listed if Precision(precision) in TARGETS[t].precisions]
    skipped = [t for t in listed if t not in able]
    if not able:
        raise ConfigError(f"{where('precisions')}: no listed target runs {precision} ({', '.join(listed) or 'none'})",
                          f"add a target that does ({', '.join(t for t, c in TARGETS.items() if Precision(precision) in c.precisions)}) "
                          "or drop the precision")
    name = f"{_slug(model)}/{precision}"
    args = {**options, "model": model_arg, "output": root / _slug(model) / precision, "targets": able,
            "quantize": precision, "force": True}
    try:
        config = export_config(args)
    except UsageError as error:
        raise ConfigError(f"{where('options')}: build {name}: {error.cause}", error.fix) from None
    runtime = {t: replace(config.runtime, **overrides[t]) for t in able if t in overrides}
    return MatrixBuild(name, replace(config, runtime_overrides=runtime), skipped)


EXAMPLE_OPTION = {"export": "int4-method", "compress": "prune-mlp"}


def _options(where, key: tuple, raw: dict, actions: dict, base: Path, command: str = "export",
             refused: set[str] = STRUCTURAL,
             why_refused: str = "the file's own keys say what is built: output, models, precisions, targets") -> dict:
    """Option values of `gptkiln COMMAND` by destination name, each checked against its argparse action;
    `refused`: the options the file sets by its own keys. Paths are made relative to the file."""
    kind = "an option" if command == "export" else f"a {command} option"
    options = {}
    for name, value in raw.items():
        dest = name.replace("-", "_")
        if dest in refused:
            raise ConfigError(f"{where(*key, name)}: '{name}' is not {kind} here", why_refused)
        if dest not in actions:
            raise ConfigError(f"{where(*key, name)}: unknown option '{name}'",
                              f"use a long option of `gptkiln {command} --help` without the dashes, e.g. "
                              f"{EXAMPLE_OPTION[command]}")
        action = actions[dest]
        options[dest] = _option_value(where, (*key, name), value, action)
        if dest in PATH_OPTIONS and options[dest] is not None:
            options[dest] = base / options[dest]
    return options


def _option_value(where, key: tuple, value, action):
    if action.nargs == 0:  # a flag
        return _expect(where, key, value, bool)
    if value is None:
        return None
    if action.type not in (None, int, float, str, Path):  # its own parser of text: e.g. a number or "auto"
        try:
            return action.type(str(_expect(where, key, value, (str, int, float))))
        except argparse.ArgumentTypeError as error:
            raise ConfigError(f"{where(*key)}: '{'.'.join(map(str, key))}': {error}", "fix the value in the file")
    kind = action.type if action.type in (int, float) else str
    value = _expect(where, key, value, kind)
    if action.choices and value not in action.choices:
        raise ConfigError(f"{where(*key)}: '{'.'.join(map(str, key))}' is {value!r}",
                          f"use one of: {', '.join(map(str, action.choices))}")
    return value


def _target_options(where, raw: dict, actions: dict, targets: list[str]) -> dict[str, dict]:
    """target -> RuntimeSettings fields of its own (the trt-* engine options go under `options`)."""
    overrides = {}
    for target, settings in raw.items():
        _choice(where, ("target_options", target), target, targets or list(_target_names()))
        _expect(where, ("target_options", target), settings, dict)
        values = {}
        for name, value in settings.items():
            dest = name.replace("-", "_")
            if dest not in TARGET_OPTIONS:
                raise ConfigError(f"{where('target_options', target, name)}: '{name}' is not a per-target setting",
                                  "use threads, performance-hint, inference-precision, kv-cache-precision or "
                                  "dynamic-quantization-group "
                                  "(engine options go under options:)")
            values[dest] = _option_value(where, ("target_options", target, name), value, actions[dest])
        for name in ("threads", "dynamic_quantization_group"):
            if (values.get(name) or 0) < 0:
                raise ConfigError(f"{where('target_options', target, name.replace('_', '-'))}: {name.replace('_', '-')} "
                                  "must be >= 0", "fix the value")
        if "performance_hint" in values:
            values["performance_hint"] = values["performance_hint"].upper()
        overrides[target] = values
    return overrides


def _target_names():
    from gptkiln.targets import TARGETS

    return TARGETS


def _slug(model: str) -> str:
    """A directory name for a model: 'preset:gpt2' -> 'preset-gpt2', './models/mine' -> 'mine'."""
    name = Path(model).name if model.startswith((".", "/", "~")) else model
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"


def _choice(where, key: tuple, value, allowed: list[str]) -> str:
    _expect(where, key, value, str)
    if value not in allowed:
        raise ConfigError(f"{where(*key)}: '{'.'.join(map(str, key))}' is {value!r}", f"use one of: {', '.join(allowed)}")
    return value


TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list",
              dict: "a mapping", (str, int, float): "a number or a word"}


def _expect(where, key: tuple, value, kind):
    ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise ConfigError(f"{where(*key)}: '{'.'.join(map(str, key))}' must be {TYPE_NAMES[kind]}, "
                          f"got {type(value).__name__} {value!r}", "fix the value in the file")
    return value


class _Locator:
    """'kiln.yaml:12' for a key path (the nearest enclosing key whose line is known)."""

    def __init__(self, path: Path, lines: dict[tuple, int]):
        self.path, self.lines = path, lines

    def __call__(self, *key) -> str:
        for end in range(len(key), 0, -1):
            if key[:end] in self.lines:
                return f"{self.path}:{self.lines[key[:end]]}"
        return str(self.path)


def _parse(path: Path) -> tuple[object, dict[tuple, int]]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".toml":
        try:
            return tomllib.loads(text), _toml_lines(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}", "fix the syntax") from None
    try:
        return yaml.safe_load(text), _yaml_lines(yaml.compose(text))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}".replace("\n", " "), "fix the syntax") from None


def _yaml_lines(node, key: tuple = (), lines: dict | None = None) -> dict[tuple, int]:
    lines = {} if lines is None else lines
    if isinstance(node, yaml.MappingNode):
        for name, value in node.value:
            lines[(*key, name.value)] = name.start_mark.line + 1
            _yaml_lines(value, (*key, name.value), lines)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines[(*key, index)] = item.start_mark.line + 1
            _yaml_lines(item, (*key, index), lines)
    return lines


def _toml_lines(text: str) -> dict[tuple, int]:
    """Lines of table headers and `key =` lines (tomllib keeps no positions)."""
    lines, table = {}, ()
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        header = re.match(r"^\[([^\[\]]+)\]", stripped)
        if header:
            table = tuple(part.strip().strip('"') for part in header.group(1).split("."))
            lines.setdefault(table, number)
        elif (assignment := re.match(r'^("?[\w.-]+"?)\s*=', stripped)):
            key = (*table, *(part.strip('"') for part in assignment.group(1).split(".")))
            lines.setdefault(key, number)
    return lines
