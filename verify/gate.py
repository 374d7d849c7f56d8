"""`python -m verify.gate`: the regression gate (verify/perf/gate.py).

This module only keeps the command's name; the code lives there."""

from verify.perf.gate import main

if __name__ == "__main__":
    raise SystemExit(main())
