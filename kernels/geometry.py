"""The geometry of one window-attention call, as one validated value, and the constants every layer shares.

Plain Python and torch only (no Triton). The geometry is validated once, where it enters (`WindowGeometry`,
built by the caller or by `takes_geometry` from the keyword block), and passed down::

    swinv2_fast.window_attention(..., geometry=g)      functional.py: tensor checks against g, dispatch
      -> window_attention_reference(..., geometry=g)   reference.py: the eager path (naive.py: the oracle)
      -> op.window_attention_fused(..., g)             op.py: the custom op, g as plain values (`as_op_args`:
                                                       the op's schema takes no WindowGeometry)
        -> launchers(..., *g.as_op_args())             triton_forward.py, triton_backward.py: the plain values
          -> launch_dims(...) -> kernels               -> launch.LaunchDims (a cheap guard, no re-validation)
                                                       -> the kernels' scalars

The keyword block `grid_size, num_heads, window_size, shift_size, pad_order, mask_value` exists in one place,
`WindowGeometry.from_args`; the public functions also accept it instead of `geometry=` through
`takes_geometry`, which converts it at the boundary::

    geometry = WindowGeometry.from_args(grid_size=(H, W), num_heads=heads, window_size=8, shift_size=4,
                                        pad_order=PAD_THEN_ROLL, mask_value=-200.0)
    window_attention_reference(qkv, qkv_bias, logit_scale, position_bias, geometry=geometry)
    window_attention_reference(qkv, qkv_bias, logit_scale, position_bias, grid_size=(H, W), num_heads=heads,
                               window_size=8, shift_size=4, pad_order=PAD_THEN_ROLL, mask_value=-200.0)
    torch.ops.swinv2_fast.window_attention_fused(qkv, qkv_bias, logit_scale, position_bias,
                                                 *geometry.as_op_args())

Sizes are per axis, (height, width) order. Derived sizes: the padded grid (Hp, Wp) is the grid rounded up
to window multiples; there are (Hp / wh) * (Wp / ww) windows of N = wh * ww tokens each.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Sequence, Tuple, TypeVar, Union, cast

import torch

__all__ = [
    "DEFAULT_MASK_VALUE",
    "GEOMETRY_ARGS",
    "LOGIT_SCALE_MAX",
    "OP_SCHEMA_GEOMETRY",
    "PAD_ORDERS",
    "PAD_THEN_ROLL",
    "ROLL_THEN_PAD",
    "IntPair",
    "WindowGeometry",
    "check_layout_args",
    "grid_needs_padding",
    "int_pair",
    "is_int",
    "is_symbolic",
    "known_true",
    "known_zero",
    "takes_geometry",
]

PAD_THEN_ROLL = "pad_then_roll"  # transformers: pad the grid, then roll the padded grid
ROLL_THEN_PAD = "roll_then_pad"  # timm: roll the un-padded grid, then pad at the bottom/right
PAD_ORDERS = (PAD_THEN_ROLL, ROLL_THEN_PAD)

# exp(logit_scale) is clamped at 1 / 0.01 = 100, as in the paper and all three public codebases.
LOGIT_SCALE_MAX = math.log(1.0 / 0.01)

# The value added to the scores of query/key pairs from different shift regions: -100 in timm and the
# official code; transformers adds its -100 mask twice, so a transformers-semantics block passes -200.
DEFAULT_MASK_VALUE = -100.0

IntPair = Union[int, Sequence[int]]


def is_symbolic(value) -> bool:
    """A symbolic size (`torch.SymInt`): what a tensor's sizes are while torch.export or torch.compile traces
    with dynamic shapes. Its value is known only as an expression; comparing it in a Python `if` would
    specialise the trace to the example's value, so the code below never branches on one."""
    return isinstance(value, torch.SymInt)


def is_int(value) -> bool:
    """An integer: Python's or numpy's (any numbers.Integral) but not a bool, a 0-d integer tensor (what
    sizes are while torch.jit.trace records; the trace then holds this call's value), or a symbolic size
    (`torch.SymInt`)."""
    if type(value) is int or isinstance(value, torch.SymInt):  # the common cases, before the ABC check below
        return True
    if isinstance(value, torch.Tensor):
        return (
            value.dim() == 0 and not value.is_floating_point() and not value.is_complex() and value.dtype != torch.bool
        )
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _as_int(value):
    """A Python int; a symbolic size stays symbolic (int() on it would specialise the trace)."""
    return value if isinstance(value, torch.SymInt) else int(value)


def int_pair(value: IntPair, name: str, symbolic: bool = False) -> Tuple[int, int]:
    """An int or a pair of ints as a pair of Python ints; TypeError naming `name` otherwise. With `symbolic`,
    symbolic sizes (torch.SymInt) are accepted and kept as they are; without it they are rejected like any
    other non-int, naming the argument."""
    if type(value) is tuple and len(value) == 2 and type(value[0]) is int and type(value[1]) is int:
        return value  # already normalised (the common case)
    ok = is_int if symbolic else (lambda v: is_int(v) and not is_symbolic(v))
    if ok(value):
        return _as_int(value), _as_int(value)
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2 and all(ok(v) for v in value):
        return _as_int(value[0]), _as_int(value[1])
    parts = value if isinstance(value, Sequence) and not isinstance(value, str) else (value,)
    if not symbolic and any(is_symbolic(v) for v in parts):
        raise TypeError(
            f"{name} must be an int or a pair of ints fixed by the model (not a symbolic size: only "
            f"grid_size follows the input's size), got {value!r}"
        )
    raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")


def _check_positive_grid(grid) -> None:
    """Each grid side >= 1. A concrete side is checked here; a symbolic one (torch.export, dynamic shapes)
    through torch._check, which records the condition for the traced program (checked again on its inputs)
    instead of specialising the trace on the example's value."""
    for side in grid:
        if is_symbolic(side):
            torch._check(side >= 1, lambda: f"grid_size must be positive, got {grid}")
        elif side < 1:
            raise ValueError(f"grid_size must be positive, got {grid}")


def check_layout_args(grid_size: IntPair, window_size: IntPair, shift_size: IntPair, pad_order: str):
    """Validate and normalise what the token movement depends on: ((H, W), (wh, ww), (sh, sw)) as ints;
    raises naming the argument, what was expected and what was received. The grid may be symbolic (the
    input's size under torch.export with dynamic shapes); the window and shift are the model's constants
    and must be concrete."""
    grid = int_pair(grid_size, "grid_size", symbolic=True)
    window = int_pair(window_size, "window_size")
    shift = int_pair(shift_size, "shift_size")
    _check_positive_grid(grid)
    if window[0] < 1 or window[1] < 1:
        raise ValueError(f"window_size must be at least 1, got {window}")
    if not (0 <= shift[0] < window[0] and 0 <= shift[1] < window[1]):
        raise ValueError(f"shift_size must lie in [0, window_size) = [0, {window}), got {shift}")
    if not isinstance(pad_order, str) or pad_order not in PAD_ORDERS:
        raise ValueError(f"pad_order must be one of {PAD_ORDERS}, got {pad_order!r}")
    return grid, window, shift


def known_true(condition) -> bool:
    """Whether a condition on sizes holds, without a Python branch on a symbolic size: a bool as it is; a
    symbolic one (torch.export or torch.compile with dynamic shapes) True only when the trace proves it for
    every size it admits, recording no guard (torch's `statically_known_true`); an fx Proxy (torch.fx sizes)
    False; a 0-d tensor (torch.jit.trace's sizes) its value, as a branch on it would. One test for both
    kinds of symbolic size: under TorchDynamo (strict export, torch.compile) a size is an int to
    `isinstance` (`is_symbolic` says False there), so a branch chosen by `is_symbolic` would evaluate the
    comparison and guard the program to the example's outcome."""
    if isinstance(condition, torch.fx.Proxy):
        return False
    if isinstance(condition, torch.Tensor):  # torch.jit.trace: sizes are 0-d tensors, the trace keeps this outcome
        return bool(condition)
    from torch.fx.experimental.symbolic_shapes import statically_known_true  # loaded on first use

    return statically_known_true(condition)


def known_zero(*values) -> bool:
    """Every value is known to be 0 (`known_true`): e.g. a padding amount, so that code pads unless no
    padding is needed at every size a trace admits (padding by 0 is exact)."""
    return all(known_true(v == 0) for v in values)


def grid_needs_padding(grid, padded_size) -> bool:
    """`WindowGeometry.needs_padding` for a grid and its padded size (the rule is stated there)."""
    return not (known_true(padded_size[0] == grid[0]) and known_true(padded_size[1] == grid[1]))


@dataclass(frozen=True)
class WindowGeometry:
    """Grid, window, shift, padding order, mask value and head count of one window-attention call; validated.

    Fields (per-axis values are (height, width) pairs of Python ints):
        grid:       (H, W) token grid, each >= 1; may be symbolic (torch.SymInt) while torch.export or
                    torch.compile trace with dynamic shapes. Then the derived sizes are expressions and
                    `needs_padding` is True unless the trace proves otherwise (see there); the geometry is
                    not hashable then (it is never a cache key while tracing).
        window:     (wh, ww) window, each >= 1.
        shift:      (sh, sw) cyclic shift, each in [0, window); (0, 0) for regular windows.
        pad_order:  PAD_THEN_ROLL (transformers) or ROLL_THEN_PAD (timm).
        mask_value: finite float added to the scores of query/key pairs from different shift regions.
        num_heads:  attention heads, >= 1.

    Build it with `from_args` (accepts ints or pairs, numpy integers, 0-d integer tensors) or directly with
    pairs of ints; either way every field is checked, and a bad one raises TypeError/ValueError naming the
    argument, what was expected and what was received.
    """

    grid: Tuple[int, int]
    window: Tuple[int, int]
    shift: Tuple[int, int]
    pad_order: str
    mask_value: float
    num_heads: int

    def __post_init__(self):
        # normalise (frozen: through object.__setattr__) and validate, once, at construction
        grid, window, shift = check_layout_args(self.grid, self.window, self.shift, self.pad_order)
        if (
            not isinstance(self.mask_value, numbers.Real)
            or isinstance(self.mask_value, bool)
            or not math.isfinite(self.mask_value)
        ):
            raise ValueError(f"mask_value must be a finite real number (e.g. -100.0), got {self.mask_value!r}")
        if not is_int(self.num_heads):
            raise TypeError(f"num_heads must be an int, got {type(self.num_heads).__name__} {self.num_heads!r}")
        if int(self.num_heads) < 1:
            raise ValueError(f"num_heads must be at least 1, got {int(self.num_heads)}")
        object.__setattr__(self, "grid", grid)
        object.__setattr__(self, "window", window)
        object.__setattr__(self, "shift", shift)
        object.__setattr__(self, "mask_value", float(self.mask_value))
        object.__setattr__(self, "num_heads", int(self.num_heads))

    @classmethod
    def from_args(
        cls,
        grid_size: IntPair,
        num_heads: int,
        window_size: IntPair,
        shift_size: IntPair = 0,
        pad_order: str = PAD_THEN_ROLL,
        mask_value: float = DEFAULT_MASK_VALUE,
    ) -> WindowGeometry:
        """From the keyword block (also the custom op's schema order: `from_args(*geometry.as_op_args())`
        gives the geometry back)."""
        # ints or pairs: __post_init__ validates them and stores pairs of ints, the fields' declared type
        return cls(
            grid=cast(Tuple[int, int], grid_size),
            window=cast(Tuple[int, int], window_size),
            shift=cast(Tuple[int, int], shift_size),
            pad_order=pad_order,
            mask_value=mask_value,
            num_heads=num_heads,
        )

    # ------------------------------------------------------------------------------------ derived sizes
    @property
    def padded_size(self) -> Tuple[int, int]:
        """(Hp, Wp): the grid rounded up to window multiples."""
        (h, w), (wh, ww) = self.grid, self.window
        return -(-h // wh) * wh, -(-w // ww) * ww

    @property
    def windows_per_axis(self) -> Tuple[int, int]:
        """(Hp / wh, Wp / ww)."""
        (hp, wp), (wh, ww) = self.padded_size, self.window
        return hp // wh, wp // ww

    @property
    def num_windows(self) -> int:
        """nW: windows per image."""
        rows, cols = self.windows_per_axis
        return rows * cols

    @property
    def window_tokens(self) -> int:
        """N = wh * ww: tokens per window (the attention matrix of one window is N x N)."""
        return self.window[0] * self.window[1]

    N = window_tokens  # the paper's name

    @property
    def num_tokens(self) -> int:
        """H * W: tokens of the un-padded grid (qkv's second dimension)."""
        return self.grid[0] * self.grid[1]

    @property
    def is_symbolic(self) -> bool:
        """The grid is symbolic (see the class docstring)."""
        return is_symbolic(self.grid[0]) or is_symbolic(self.grid[1])

    @property
    def needs_padding(self) -> bool:
        """Whether the grid is smaller than the padded grid. With a symbolic grid: False only when the trace
        proves the grid a window multiple for every size it admits, else True; padding that turns out empty
        is exact (the pad token is then never gathered), while a branch on the size would specialise the
        trace to the example's size."""
        return grid_needs_padding(self.grid, self.padded_size)

    @property
    def shifted(self) -> bool:
        return self.shift != (0, 0)

    @property
    def roll_shift(self) -> Tuple[int, int]:
        """The shift modulo the extent it rolls: the un-padded grid (timm, ROLL_THEN_PAD) or the padded grid
        (transformers, PAD_THEN_ROLL)."""
        extent = self.grid if self.pad_order == ROLL_THEN_PAD else self.padded_size
        return self.shift[0] % extent[0], self.shift[1] % extent[1]

    @property
    def layout_key(self) -> Tuple[int, int, int, int, int, int, str]:
        """(H, W, wh, ww, sh, sw, pad_order): what the token movement depends on (not heads, not mask value)."""
        return (*self.grid, *self.window, *self.shift, self.pad_order)

    # ------------------------------------------------------------------------------------ conversions
    def head_dim(self, qkv_channels: int) -> int:
        """C / num_heads for qkv's last dimension 3 * C; ValueError if it does not divide."""
        if qkv_channels % (3 * self.num_heads) != 0:
            raise ValueError(
                f"qkv's last dimension must be 3 * num_heads * head_dim; got {qkv_channels} "
                f"with num_heads={self.num_heads}"
            )
        return qkv_channels // (3 * self.num_heads)

    def as_op_args(self) -> Tuple[List[int], int, List[int], List[int], str, float]:
        """(grid_size, num_heads, window_size, shift_size, pad_order, mask_value) as the custom op's schema
        takes them: `List[int], int, List[int], List[int], str, float`."""
        return list(self.grid), self.num_heads, list(self.window), list(self.shift), self.pad_order, self.mask_value

    def as_kwargs(self) -> Dict[str, Any]:
        """The keyword block `grid_size, num_heads, window_size, shift_size, pad_order, mask_value`, pairs as
        tuples: `WindowGeometry.from_args(**dict(g.as_kwargs(), shift_size=0))` is g without its shift."""
        return dict(
            grid_size=self.grid,
            num_heads=self.num_heads,
            window_size=self.window,
            shift_size=self.shift,
            pad_order=self.pad_order,
            mask_value=self.mask_value,
        )


# The keyword block, as `from_args` names it (its parameters after `cls`), and as the custom ops' schema
# spells it (the same order: `as_op_args()` fills it, `from_args(*args)` reads it back).
GEOMETRY_ARGS: Tuple[str, ...] = tuple(inspect.signature(WindowGeometry.from_args).parameters)
# grid_size is SymInt[]: under torch.export with dynamic shapes the op is recorded with the symbolic grid
# (an int[] argument would specialise the program to the example's size).
OP_SCHEMA_GEOMETRY = (
    "SymInt[] grid_size, int num_heads, int[] window_size, int[] shift_size, str pad_order, float mask_value"
)

_F = TypeVar("_F", bound=Callable[..., Any])


def takes_geometry(function: _F) -> _F:
    """Lets `function`, whose signature takes a keyword-only `geometry: WindowGeometry`, also be called with
    the keyword block `GEOMETRY_ARGS` instead (converted by `WindowGeometry.from_args`, so omitted
    shift_size, pad_order and mask_value take its defaults): the one place the public functions convert the
    block, at their boundary. Passing both, a block without grid_size, num_heads or window_size, or a
    `geometry` that is not a WindowGeometry raises a TypeError saying so."""
    defaults = inspect.signature(WindowGeometry.from_args).parameters
    required = [name for name in GEOMETRY_ARGS if defaults[name].default is inspect.Parameter.empty]

    @functools.wraps(function)
    def call(*args, geometry=None, **kwargs):
        block = {name: kwargs.pop(name) for name in GEOMETRY_ARGS if name in kwargs}
        if geometry is not None:
            if not isinstance(geometry, WindowGeometry):
                raise TypeError(f"geometry must be a WindowGeometry, got {type(geometry).__name__}")
            if block:
                raise TypeError(f"pass either geometry or the keyword block, not both; got geometry and {list(block)}")
        else:
            missing = [name for name in required if block.get(name) is None]
            if missing:
                raise TypeError(f"{', '.join(missing)} required (or geometry=WindowGeometry(...)), got None")
            geometry = WindowGeometry.from_args(**{k: v for k, v in block.items() if v is not None})
        return function(*args, geometry=geometry, **kwargs)

    # what help() and IDEs show: the function's own parameters, then the block as keyword-only alternatives
    signature = inspect.signature(function)
    block_params = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None) for name in GEOMETRY_ARGS]
    params = list(signature.parameters.values())
    at = [p.name for p in params].index("geometry")
    params[at] = params[at].replace(default=None)
    at += 1
    # Any: functools.wraps' wrapper type declares no __signature__ (which inspect.signature reads), nor is it _F
    wrapper: Any = call
    wrapper.__signature__ = signature.replace(parameters=params[:at] + block_params + params[at:])
    return wrapper
