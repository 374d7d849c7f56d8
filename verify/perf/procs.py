"""Run several `python -m ...` commands at once (each its own process: own CUDA context, own JIT compiles)."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor


def run_modules(argvs: list[list[str]], jobs: int) -> list[subprocess.CompletedProcess]:
    """`python <argv>` for each argv, `jobs` at a time, outputs captured; results in argv order."""
    def one(argv):
        return subprocess.run([sys.executable, *argv], capture_output=True, text=True)

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        return list(pool.map(one, argvs))
