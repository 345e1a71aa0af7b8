"""Window-attention implementations of swinv2_fast, none of which needs Triton to import:

- `geometry`: `WindowGeometry`, the validated grid/window/shift/padding-order/mask/heads of a call, and the
  constants every layer shares;
- `naive`: the specification, the literal pad/roll/partition chain (`window_attention_naive`), which the
  tests hold every other implementation to;
- `reference`: the eager path the models run without the fused kernels (`window_attention_reference`:
  gather indices and PyTorch's scaled_dot_product_attention), with its bounded layout caches;
- `tiles`: the fused kernels' policy (the head dims and dtypes they serve, their tiles, which backward
  kernels run), which the dispatch asks without Triton;
- `launch`: the integers, flags and small operands the launchers hand the kernels (no Triton).

The fused path (`op`: the custom ops; `triton_forward` and `triton_backward`: the Triton kernels and their
launchers; `triton_common`: the `@triton.jit` helpers both share) is imported only when first launched.
The tools that compile, cost and sweep the kernels are not part of the package: `tools/` at the repository root.

This folder is the package `swinv2_fast.kernels`. Imported as a top-level `kernels` (a process whose
`sys.path` starts with the repository root, e.g. `python -m ...` run there), it would shadow Hugging Face's
`kernels` package, which transformers imports; so under that name it hands the import over to the
installed `kernels` package, or, when there is none, stays an empty module without a file (what
transformers' probe reads as "not installed"); it never loads itself under that name.
"""

if __name__ == "kernels":
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _elsewhere = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _root]
    _spec = _machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is not None and _spec.loader is not None:
        _module = _util.module_from_spec(_spec)
        _sys.modules["kernels"] = _module  # the import statement returns what sys.modules holds after this body
        _spec.loader.exec_module(_module)
    else:  # none installed: an empty module without a file, which transformers' probe reads as "not installed"
        __file__ = None  # type: ignore[assignment]
        __path__ = []
else:
    from .geometry import LOGIT_SCALE_MAX, PAD_ORDERS, PAD_THEN_ROLL, ROLL_THEN_PAD, WindowGeometry
    from .naive import window_attention_naive, window_log_sum_exp
    from .reference import WindowLayout, shift_mask, window_attention_reference, window_layout

    __all__ = [
        "LOGIT_SCALE_MAX",
        "PAD_ORDERS",
        "PAD_THEN_ROLL",
        "ROLL_THEN_PAD",
        "WindowGeometry",
        "WindowLayout",
        "shift_mask",
        "window_attention_naive",
        "window_attention_reference",
        "window_layout",
        "window_log_sum_exp",
    ]
