"""Memory read bandwidth as this machine delivers it to `threads` threads: the decode floor's denominator.

Two read-only kernels over a buffer far larger than the caches, best of several passes:
a matrix-vector product (what a decode step is: every weight read once) and a max over
the buffer split across threads. The faster one is the measured bandwidth. It runs in a
child process so that the BLAS thread count can be fixed before numpy loads.

    python -m gptkiln.bench.bandwidth --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

BUFFER_BYTES = 1 << 30
PASSES = 5


def read_bandwidth(threads: int) -> dict:
    """{"gb_per_s", "kernel", "kernels": {name: GB/s}} measured with `threads` threads."""
    variables = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
    env = {**os.environ, **{name: str(threads) for name in variables}}
    out = subprocess.run([sys.executable, "-m", "gptkiln.bench.bandwidth", "--threads", str(threads)], env=env,
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def _measure(threads: int) -> dict:
    import numpy as np

    matrix = np.ones((BUFFER_BYTES // 4 // 4096, 4096), np.float32)
    vector = np.ones(4096, np.float32)
    chunks = np.array_split(matrix.reshape(-1), threads)
    with ThreadPoolExecutor(threads) as pool:
        kernels = {"matrix-vector product": lambda: matrix @ vector,
                   "threaded max": lambda: list(pool.map(np.max, chunks))}
        speeds = {name: _best_gb_per_s(kernel, matrix.nbytes) for name, kernel in kernels.items()}
    best = max(speeds, key=speeds.get)
    return {"gb_per_s": speeds[best], "kernel": best, "kernels": speeds}


def _best_gb_per_s(kernel, nbytes: int) -> float:
    kernel()  # first touch
    fastest = float("inf")
    for _ in range(PASSES):
        started = time.perf_counter()
        kernel()
        fastest = min(fastest, time.perf_counter() - started)
    return round(nbytes / fastest / 1e9, 2)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, required=True)
    print(json.dumps(_measure(parser.parse_args().threads)))
