"""A release-pipeline step: build a matrix from a build file, pack each build into a bundle,
smoke-test every bundle the way a device would, and write dist/release.json.

    python examples/release_step.py examples/release/kiln.yaml --bundles dist

It drives the `gptkiln` command line (what a CI job would call) and stops with gptkiln's exit
code on the first class of failure, after writing what it has: 12 a bad build file, 3-7 a
model or export problem, 8 a target this machine lacks, 9 a build that missed its parity or
accuracy gate, 13 a bundle that does not verify.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

SMOKE_PROMPT = "def main():"


def gptkiln(*args: str) -> tuple[int, dict]:
    """Run the gptkiln CLI with --json; progress goes through to our stderr."""
    proc = subprocess.run([sys.executable, "-m", "gptkiln", *args, "--json"], stdout=subprocess.PIPE, text=True)
    return proc.returncode, json.loads(proc.stdout)


def ensure_calibration_text(build_file: Path) -> None:
    """The example's calibration text: Python source (the reference model's domain) from the standard library."""
    path = build_file.parent / "calibration.txt"
    if not path.exists():
        stdlib = Path(os.__file__).parent
        names = ("argparse.py", "typing.py", "inspect.py", "dataclasses.py", "pathlib.py", "subprocess.py")
        path.write_text("\n\n".join((stdlib / n).read_text(encoding="utf-8") for n in names), encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("build_file", type=Path)
    parser.add_argument("--bundles", type=Path, default=Path("dist"))
    args = parser.parse_args()
    ensure_calibration_text(args.build_file)

    code, plan = gptkiln("build", str(args.build_file), "--dry-run")
    if code:
        print(f"release: the build file was refused: {plan['error']['cause']}", file=sys.stderr)
        return code
    for entry in plan["plan"]:
        print(f"release: plan {entry['name']}: " + ("up to date" if entry.get("up_to_date") else
              ", ".join(f"{k} {v}" for k, v in entry.get("stages", {}).items())), file=sys.stderr)

    code, built = gptkiln("build", str(args.build_file))
    args.bundles.mkdir(parents=True, exist_ok=True)
    release = {"builds": [], "failed": [b["name"] for b in built.get("builds", []) if not b["ok"]]}
    for item in built.get("builds", []):
        if not item["ok"]:
            continue
        bundle = args.bundles / f"{item['name'].replace('/', '-')}.kiln.tar"
        pack_code, packed = gptkiln("pack", item["output"], "-o", str(bundle))
        if pack_code:
            return pack_code
        for target in packed["manifest"]["targets"]:  # verify and run every bundle as a device would
            run_code, ran = gptkiln("run", str(bundle), "--target", target, "--prompt", SMOKE_PROMPT,
                                    "--max-new-tokens", "8")
            if run_code:
                print(f"release: {bundle} ({target}) did not run: {ran['error']['cause']}", file=sys.stderr)
                return run_code
        release["builds"].append({"name": item["name"], "bundle": bundle.name, "bytes": packed["bytes"],
                                  "sha256": hashlib.sha256(bundle.read_bytes()).hexdigest(),
                                  "targets": {t: v["gate"] for t, v in packed["manifest"]["targets"].items()}})
    (args.bundles / "release.json").write_text(json.dumps(release, indent=2) + "\n")
    print(f"release: {len(release['builds'])} bundles in {args.bundles}; failed builds: "
          f"{', '.join(release['failed']) or 'none'}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
