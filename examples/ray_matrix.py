"""Fan a build file's matrix out over a Ray cluster: one Ray task per build.

    pip install ray
    python examples/ray_matrix.py examples/release/kiln.yaml [--address auto]

Each build of the file is independent (its own output directory), so it maps onto one task;
gptkiln.matrix.run_one is what `gptkiln build` runs for each build too. For a cluster, point
GPTKILN_CACHE_DIR and the file's `output` at storage every node mounts: the stage cache's
entries are published by rename, and its per-key lock (flock) keeps two nodes from building the
same stage at once where the file system honours flock (local disks, NFSv4; not every FUSE).
"""

from __future__ import annotations

import argparse
import json

import ray

from gptkiln.build_file import read_build_file
from gptkiln.matrix import matrix_summary, run_one


@ray.remote(num_cpus=2)  # a build uses the cores it is given; raise for larger models
def build_task(item):
    return run_one(item)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("build_file")
    parser.add_argument("--address", help="an existing Ray cluster (default: start a local one)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    builds = read_build_file(args.build_file).builds
    ray.init(address=args.address)
    outcomes = ray.get([build_task.remote(item) for item in builds])
    print(json.dumps(outcomes, indent=2) if args.json else matrix_summary(outcomes))
    failed = [o for o in outcomes if not o["ok"]]
    return failed[0]["error"]["exit_code"] if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
