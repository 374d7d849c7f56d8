"""`python -m verify.mutants`: the mutant hunt and its kill matrix (verify/power/hunt.py).

This module only keeps the command's name; the code lives there."""

from verify.power.hunt import main

if __name__ == "__main__":
    raise SystemExit(main())
