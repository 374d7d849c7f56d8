"""The differential tester. Importing it selects the Triton interpreter on a CPU-only machine before anything imports
triton (kernels._device.configure_triton), so that its commands and modules need no ritual of their own."""

from kernels._device import configure_triton

configure_triton()
