"""What every kernel launcher shares: the optional Triton import, impl dispatch and argument checks.

Triton is only in the test extra, so a CPU-only install imports these modules without it and runs
the torch references. The kernel files use `from __future__ import annotations`, so `tl.constexpr`
annotations stay strings and `tl` is never touched unless a kernel is actually compiled.
"""
from __future__ import annotations

import functools

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU install without the test extra: only the reference path exists
    triton = None
    tl = None

IMPLS = (None, "triton", "torch")

try:        # Hopper grid-dependency control (programmatic dependent launch); absent in old Tritons
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except Exception:  # noqa: BLE001 - without it the PDL variants are unavailable
    gdc_launch_dependents = gdc_wait = None


def _fix_interpreter_index() -> None:
    """Triton 3.6's interpreter holds scalars as 1-element arrays and its Tensor.__index__ calls
    int() on them, which numpy >= 2.4 refuses, so `range(lo, hi)` with run-time bounds fails.
    .item() accepts any 1-element array. Only patched when the interpreter is on."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "fixed_index", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patched.fixed_index = True
    interpreter._patch_lang_tensor = patched


if triton is not None and triton.knobs.runtime.interpret:
    _fix_interpreter_index()


def jit(fn=None, *, do_not_specialize=()):
    """triton.jit when Triton is importable; otherwise a stub that explains what is missing.

    `do_not_specialize` names integer arguments that change from call to call (batch sizes,
    block-table widths): Triton would otherwise compile a variant for each of their classes
    (== 1, multiple of 16, other), which costs a second or more mid-serving."""
    if fn is None:
        return functools.partial(jit, do_not_specialize=do_not_specialize)
    if triton is not None:
        return triton.jit(fn, do_not_specialize=list(do_not_specialize) or None)

    def missing(*args, **kwargs):
        raise RuntimeError(f"{fn.__name__}: Triton is not installed; install the triton your torch requires "
                           "or call with impl='torch'")
    return _Missing(missing)


class _Missing:
    """Stands in for a kernel when Triton is absent; kernel[grid](...) raises `fn`'s error."""

    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        return self.fn


def is_interpreted(kernel) -> bool:
    """True when `kernel` was decorated under TRITON_INTERPRET=1 (it then runs on CPU tensors)."""
    return type(kernel).__name__ == "InterpretedFunction"


def use_triton(op: str, impl: str | None, kernel, *tensors: torch.Tensor) -> bool:
    """Dispatch rule shared by all public functions: impl=None picks Triton for CUDA tensors and
    the reference for CPU ones; "triton" forces Triton; "torch" forces the reference."""
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be None, 'triton' or 'torch', got {impl!r}")
    if impl == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    if impl is None:
        return on_cuda and triton is not None
    if triton is None:
        raise ValueError(f"{op}: impl='triton' needs the triton package (the version your torch "
                         "requires: 3.6-3.7 for torch 2.11-2.13)")
    if not on_cuda and not is_interpreted(kernel):
        raise ValueError(f"{op}: impl='triton' on CPU tensors needs TRITON_INTERPRET=1 set before "
                         "kernels/ is imported; move the tensors to CUDA or use impl='torch'")
    return True


def check_tensor(op: str, name: str, t, *, ndim: int | None = None, dtypes=None,
                 device: torch.device | None = None, contiguous: bool = False,
                 unit_last_stride: bool = True) -> None:
    """Raise ValueError naming `name` when `t` is not a tensor of the expected rank, dtype,
    device and layout."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{op}: {name} must be one of ({names}), got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device} but the other inputs are on {device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous (strides {t.stride()}); call .contiguous()")
    if unit_last_stride and t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{op}: {name} must have stride 1 in its last dim, got strides {t.stride()}")


def check_shape(op: str, name: str, t: torch.Tensor, shape: tuple) -> None:
    """Raise ValueError unless t.shape matches `shape` (None entries match anything)."""
    if len(t.shape) != len(shape) or any(w is not None and s != w for s, w in zip(t.shape, shape)):
        want = tuple("*" if w is None else w for w in shape)
        raise ValueError(f"{op}: {name} must have shape {want}, got {tuple(t.shape)}")


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_sms(t: torch.Tensor) -> int:
    """Multiprocessors of t's GPU; a small fixed number in the interpreter so that the automatic
    split heuristics are exercised on tiny CPU shapes."""
    if not t.is_cuda:
        return 4
    return num_sms(t.device.index if t.device.index is not None else torch.cuda.current_device())


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def output_like(op: str, out, q: torch.Tensor) -> torch.Tensor:
    """A fresh tensor like q, or `out` checked to match q's shape, dtype and device (rows may be
    strided: a mixed batch writes two kernels' outputs into row ranges of one tensor)."""
    if out is None:
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    check_tensor(op, "out", out, ndim=q.dim(), dtypes=(q.dtype,), device=q.device)
    check_shape(op, "out", out, tuple(q.shape))
    return out
