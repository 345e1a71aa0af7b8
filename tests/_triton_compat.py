"""Compatibility shims for running the kernel tests on other package stacks (see install()).

The shim: Triton's interpreter before 3.8 converts a scalar kernel argument to a Python int with
`int(self.handle.data)` (`tl.tensor.__index__`, patched in by `triton.runtime.interpreter._patch_lang_tensor`
while a kernel is interpreted), and the data is a 1-element numpy array. numpy 2.4 turned the deprecation of
`int()` on such arrays into `TypeError: only 0-dimensional arrays can be converted to Python scalars`, so the
first `range(0, N, BLOCK_N)` of a kernel fails (the GPU machine's stack: triton 3.6.0, numpy 2.5.2). Triton
3.8 squeezes first; the shim does the same, on the versions that need it and nowhere else. It changes only
what the interpreter patches in for the duration of a kernel run, and only when the interpreter is used.
"""

import re

_MARK = "_swinv2_fast_index_shim"


def _version(module) -> tuple:
    return tuple(int(x) for x in re.findall(r"\d+", module.__version__)[:2])


def needs_index_shim(triton_version: tuple, numpy_version: tuple) -> bool:
    """True for triton < 3.8 beside numpy >= 2.4 (the pairs whose interpreter raises on int(array))."""
    return triton_version < (3, 8) and numpy_version >= (2, 4)


def install() -> None:
    """Applied by tests/conftest.py and by the spawned workers of the distributed tests, before any kernel
    runs. Nothing to do on the pinned CI stack (triton 3.8) or where Triton does not import."""
    try:
        import numpy
        import triton
    except Exception:  # no Triton here: the kernel tests skip or use the eager path
        return
    if not needs_index_shim(_version(triton), _version(numpy)):
        return
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:
        raise RuntimeError(
            f"triton {triton.__version__}: triton.runtime.interpreter has no _patch_lang_tensor; "
            "the numpy >= 2.4 shim in tests/_triton_compat.py needs updating for this version"
        )
    if getattr(original, _MARK, False):
        return  # installed already (conftest, then a worker importing it again)

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        # triton 3.8's definition; the scope restores both patches in reverse order after the kernel
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    setattr(_patch_lang_tensor, _MARK, True)
    interpreter._patch_lang_tensor = _patch_lang_tensor
