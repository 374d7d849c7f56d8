"""How the tester calls an implementation under test: one home for loading `MODULE:CALLABLE`, detecting its framework,
and calling it with what it takes.

- Framework: a JAX implementation (arrays in, an array out; recognised by a `framework = "jax"` attribute, by being
  jit-compiled, or by code that names a JAX module or a jit-compiled function, itself or through a function it calls)
  is wrapped so that it takes and returns torch tensors, through DLPack: no
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
import importlib.abc
import importlib.machinery
import importlib.util
import inspect
import sys
import types
from collections.abc import Callable
from pathlib import Path

import torch

from kernels import Stages
from verify.interpreter import round_as_gpu


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


_OUR_KERNELS = Path(__file__).resolve().parents[1] / "kernels" / "__init__.py"


class _NoHubKernels(importlib.abc.MetaPathFinder):
    """Tells transformers that Hugging Face's hub-kernels package is unavailable when the `kernels` this process
    imports is this project's: the two share one import name, and transformers (5.25 on), finding ours, imports its
    hub-kernel API from it at the first model import and fails (ImportError: cannot import name 'CUDAProperties' from
    'kernels'). Hub kernels replace a layer's forward only when asked (`use_kernels=True`), so nothing an
    implementation under test runs changes. Installed by `guard_hub_kernels`; it acts when transformers' import_utils
    is imported, so a process that never imports transformers pays nothing."""

    NAME = "transformers.utils.import_utils"

    def find_spec(self, name, path, target=None):
        if name != self.NAME:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                _unavailable(module)

            spec.loader.exec_module = exec_module
        return spec


def _unavailable(import_utils: types.ModuleType) -> None:
    import_utils.is_kernels_available = lambda *args, **kwargs: False
    utils = sys.modules.get("transformers.utils")
    if utils is not None and hasattr(utils, "is_kernels_available"):
        utils.is_kernels_available = import_utils.is_kernels_available


def guard_hub_kernels() -> None:
    """Make the `kernels` name clash with Hugging Face's hub-kernels package harmless in this process, for any
    implementation under test (`_NoHubKernels`); a no-op where `import kernels` finds another package."""
    spec = importlib.util.find_spec("kernels")
    if spec is None or spec.origin is None or Path(spec.origin).resolve() != _OUR_KERNELS:
        return
    if _NoHubKernels.NAME in sys.modules:
        _unavailable(sys.modules[_NoHubKernels.NAME])
    elif not any(isinstance(finder, _NoHubKernels) for finder in sys.meta_path):
        sys.meta_path.insert(0, _NoHubKernels())


def load(spec: str) -> Implementation:
    """The implementation `MODULE:CALLABLE` names; UsageError (naming --impl) when it cannot be had. Whatever it
    imports, the hub-kernels name clash is made harmless first (`guard_hub_kernels`), and under the Triton
    interpreter its kernels round as a GPU does (verify/interpreter.py)."""
    guard_hub_kernels()
    round_as_gpu()
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


def _is_jax(fn: Callable, depth: int = 2) -> bool:
    """Declared (`fn.framework == "jax"`), jit-compiled, or a function whose code names a JAX module or a
    jit-compiled function, in its globals or its closure, or calls a function that does (`depth` calls deep): a thin
    Python wrapper around a jitted function is JAX too."""
    if "jax" not in sys.modules:
        return False
    if getattr(fn, "framework", None) in ("jax", "torch"):
        return fn.framework == "jax"

    def jax_like(value) -> bool:
        return (hasattr(value, "lower") and hasattr(value, "trace")) or (
            isinstance(value, types.ModuleType) and value.__name__.split(".")[0] == "jax")

    fn = inspect.unwrap(fn)
    code = getattr(fn, "__code__", None)
    if jax_like(fn):
        return True
    if code is None:
        return False
    named = [fn.__globals__.get(name) for name in code.co_names]
    named += [cell.cell_contents for cell in (fn.__closure__ or ()) if cell.cell_contents is not None]
    return any(jax_like(v) for v in named) or (depth > 0 and any(
        isinstance(v, types.FunctionType) and v is not fn and _is_jax(v, depth - 1) for v in named))


def _through_dlpack(fn: Callable) -> Callable[..., torch.Tensor]:
    import jax

    def call(*tensors: torch.Tensor, **options) -> torch.Tensor:
        arrays = [jax.dlpack.from_dlpack((t.to(torch.int32) if t.dtype == torch.int64 else t).contiguous())
                  for t in tensors]
        return torch.from_dlpack(fn(*arrays, **options))

    call.__wrapped__ = fn  # (the signature stays fn's)
    return call
