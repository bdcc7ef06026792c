"""A release-pipeline step on gptkiln's Python API: build a matrix from a build file, pack each build into a
bundle, smoke-test every bundle the way a device would, and write dist/release.json.

    python examples/release_step.py examples/release/kiln.yaml --bundles dist

It stops with gptkiln's exit code on the first class of failure, after writing what it has: 12 a bad
build file, 3-7 a model or export problem, 8 a target this machine lacks, 9 a build that missed its parity
or accuracy gate, 13 a bundle that does not verify.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import gptkiln
from gptkiln.errors import GptkilnError

SMOKE_PROMPT = "def main():"


def ensure_calibration_text(build_file: Path) -> None:
    """The example's calibration text: Python source (the reference model's domain) from the standard library."""
    path = build_file.parent / "calibration.txt"
    if not path.exists():
        stdlib = Path(os.__file__).parent
        names = ("argparse.py", "typing.py", "inspect.py", "dataclasses.py", "pathlib.py", "subprocess.py")
        path.write_text("\n\n".join((stdlib / n).read_text(encoding="utf-8") for n in names), encoding="utf-8")


def release(build_file: Path, bundles: Path) -> int:
    for entry in gptkiln.build(build_file, dry_run=True):
        print(f"release: plan {entry['name']}: " + ("up to date" if entry.get("up_to_date") else
              ", ".join(f"{k} {v}" for k, v in entry.get("stages", {}).items())), file=sys.stderr)
    built = gptkiln.build(build_file)
    bundles.mkdir(parents=True, exist_ok=True)
    failed = [b for b in built if not b["ok"]]
    record = {"builds": [], "failed": [b["name"] for b in failed]}
    for item in built:
        if not item["ok"]:
            continue
        bundle = bundles / f"{item['name'].replace('/', '-')}.kiln.tar"
        packed = gptkiln.pack(item["output"], bundle)
        for target in packed["targets"]:  # verify and run every bundle as a device would
            with gptkiln.load(bundle, target, bundle=True) as model:
                if not model.generate(SMOKE_PROMPT, max_new_tokens=8).strip():
                    print(f"release: {bundle} ({target}) generated nothing", file=sys.stderr)
                    return 9
        record["builds"].append({"name": item["name"], "bundle": bundle.name, "bytes": bundle.stat().st_size,
                                 "sha256": hashlib.sha256(bundle.read_bytes()).hexdigest(),
                                 "targets": {t: v["gate"] for t, v in packed["targets"].items()}})
    (bundles / "release.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"release: {len(record['builds'])} bundles in {bundles}; failed builds: "
          f"{', '.join(record['failed']) or 'none'}", file=sys.stderr)
    return failed[0]["error"]["exit_code"] if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("build_file", type=Path)
    parser.add_argument("--bundles", type=Path, default=Path("dist"))
    args = parser.parse_args()
    ensure_calibration_text(args.build_file)
    try:
        return release(args.build_file, args.bundles)
    except GptkilnError as error:
        print(f"release: {error}", file=sys.stderr)
        return error.exit_code


if __name__ == "__main__":
    sys.exit(main())
