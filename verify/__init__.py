"""The differential tester. Importing it selects the Triton interpreter on a CPU-only machine before anything imports
triton (kernels._device.configure_triton), so that its commands and modules need no ritual of their own, and makes the
interpreter round as a GPU does for every kernel the tester runs (verify/interpreter.py)."""

from kernels._device import configure_triton
from verify.interpreter import round_as_gpu

configure_triton()
round_as_gpu()
