"""`python -m verify.bench`: the bench (verify/perf/bench.py).

This module only keeps the command's name; the code lives there."""

from verify.perf.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
