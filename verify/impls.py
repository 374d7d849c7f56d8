"""How the tester calls an implementation under test: one home for loading `MODULE:CALLABLE`, detecting its framework,
and calling it with what it takes.

- Framework: a JAX implementation (arrays in, an array out; recognised by being jit-compiled, or by code that names a
  JAX module or a jit-compiled function) is wrapped so that it takes and returns torch tensors, through DLPack: no
  copy on either side, except integer ids, which go as int32 (JAX runs without 64-bit integers by default). NumPy is
  never in the way, so bf16 needs no special case. Anything else is called as a torch implementation.
- Keywords: the tester always knows ep_size, ep_rank, num_experts, layout, gate_up_order, ...; an implementation is
  given only those its signature names (all of them when it takes **kwargs).
- Layouts: an implementation that takes no `layout` has no layout rows (verify/sweep.py).
- Stages: one whose `stages=` keyword defaults to a kernels.Stages exposes its pipeline to the tester's probes.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import sys
import types
from collections.abc import Callable

import torch

from kernels import Stages


class UsageError(Exception):
    """A command-line mistake: reported in one line, exit code 2."""


def no_verdict(prog: str, exc: torch.OutOfMemoryError) -> int:
    """The device ran out of memory: that says nothing of the implementation (a crash of its own is a finding, this
    is not; the gate answers the same), so the command gives no verdict: one line, exit code 2."""
    print(f"{prog}: no verdict: the device ran out of memory ({str(exc).splitlines()[0]})", file=sys.stderr)
    return 2


@dataclasses.dataclass(frozen=True)
class Implementation:
    name: str  # how the user named it (MODULE:CALLABLE), or the callable's name
    fn: Callable[..., torch.Tensor]  # torch tensors in and out (a JAX callable is wrapped)
    framework: str  # "torch" or "jax"
    keywords: frozenset[str] | None  # the keyword arguments it takes; None: any (**kwargs)
    stages: Stages | None  # its own pipeline stages, when it exposes them

    @property
    def has_layouts(self) -> bool:
        return self.takes("layout")

    def takes(self, keyword: str) -> bool:
        return self.keywords is None or keyword in self.keywords

    def __call__(self, *args, **options) -> torch.Tensor:
        return self.fn(*args, **{k: v for k, v in options.items() if self.takes(k)})


def load(spec: str) -> Implementation:
    """The implementation `MODULE:CALLABLE` names; UsageError (naming --impl) when it cannot be had."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UsageError(f"--impl must be MODULE:CALLABLE, got {spec!r}")
    try:
        obj = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as exc:
        raise UsageError(f"cannot import --impl {spec}: {type(exc).__name__}: {exc}") from None
    if not callable(obj):
        raise UsageError(f"--impl {spec} is not callable")
    return implementation(obj, spec)


def implementation(fn: Callable | Implementation, name: str | None = None) -> Implementation:
    """`fn` as an Implementation (unchanged if it is one)."""
    if isinstance(fn, Implementation):
        return fn
    framework = "jax" if _is_jax(fn) else "torch"
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin or compiled callable without a signature: give it everything
        parameters = {}
    if not parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        keywords = None
    else:
        keywords = frozenset(name for name, p in parameters.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL)
    stages = parameters.get("stages")
    stages = stages.default if stages is not None and isinstance(stages.default, Stages) else None
    call = _through_dlpack(fn) if framework == "jax" else fn
    return Implementation(name or getattr(fn, "__name__", repr(fn)), call, framework, keywords, stages)


def _is_jax(fn: Callable) -> bool:
    """A jit-compiled function, or a function whose code names a JAX module or a jit-compiled function."""
    def jax_like(value) -> bool:
        return (hasattr(value, "lower") and hasattr(value, "trace")) or (
            isinstance(value, types.ModuleType) and value.__name__.split(".")[0] == "jax")

    if "jax" not in sys.modules:
        return False
    fn = inspect.unwrap(fn)
    code = getattr(fn, "__code__", None)
    return jax_like(fn) or (code is not None and any(jax_like(fn.__globals__.get(name)) for name in code.co_names))


def _through_dlpack(fn: Callable) -> Callable[..., torch.Tensor]:
    import jax

    def call(*tensors: torch.Tensor, **options) -> torch.Tensor:
        arrays = [jax.dlpack.from_dlpack((t.to(torch.int32) if t.dtype == torch.int64 else t).contiguous())
                  for t in tensors]
        return torch.from_dlpack(fn(*arrays, **options))

    call.__wrapped__ = fn  # (the signature stays fn's)
    return call
