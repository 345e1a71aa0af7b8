"""The window semantics of each library: one table, read by the models, the config and every patch.

Swin V2's three public codebases agree on the attention inside a window and differ in how a block lays its
windows over a grid that the window does not divide, or that is shifted:

- pad order: transformers pads the grid to window multiples, then rolls the padded grid (`PAD_THEN_ROLL`);
  timm and the official code roll the grid as it is, then pad at the bottom and right (`ROLL_THEN_PAD`).
  The two differ on padded, shifted grids.
- shift-mask value: the value added to the scores of query/key pairs from different shift regions. timm and
  the official code add -100 once; transformers adds its -100 mask twice, so a transformers-semantics block
  adds -200. The two differ only at large logit scales.
- window choice: transformers takes a square window, min(stage height, window_size), and no shift when the
  height fits in one window; timm chooses the window and the shift per axis.

`SEMANTICS` holds these rules by semantics name ("transformers", "timm"); `Swinv2Config.window_semantics`
names one of its keys. The official code never pads, so timm's semantics reproduce it.
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Tuple

from .kernels.geometry import PAD_THEN_ROLL, ROLL_THEN_PAD, known_zero

__all__ = ["SEMANTICS", "WindowSemantics", "grid_is_padded", "window_and_shift"]


class WindowSemantics(NamedTuple):
    """One library's window rules (see the module docstring)."""

    pad_order: str  # PAD_THEN_ROLL or ROLL_THEN_PAD
    mask_value: float  # added once to the scores of pairs from different shift regions
    square_window: bool  # True: one square window from the stage height; False: window and shift per axis


SEMANTICS: Dict[str, WindowSemantics] = {
    "transformers": WindowSemantics(pad_order=PAD_THEN_ROLL, mask_value=-200.0, square_window=True),
    "timm": WindowSemantics(pad_order=ROLL_THEN_PAD, mask_value=-100.0, square_window=False),
}


def window_and_shift(
    resolution, window_size: int, shift_size: int, semantics: str
) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """The (window, shift) pairs a block uses at a stage `resolution`, chosen at construction by the window
    choice rule of `semantics` (a key of `SEMANTICS`).

    Square (transformers): the window is min(height, window_size) on both axes; the shift is 0 when
    height <= window. Per axis (timm): the window is min(axis, window_size) and the shift is 0 where
    axis <= window.
    """
    rh, rw = resolution
    if SEMANTICS[semantics].square_window:
        w = min(rh, window_size)
        s = 0 if rh <= w else shift_size
        return (w, w), (s, s)
    wh, ww = min(rh, window_size), min(rw, window_size)
    return (wh, ww), (0 if rh <= wh else shift_size, 0 if rw <= ww else shift_size)


def grid_is_padded(height, width, window) -> bool:
    """Whether an (height, width) grid is padded to multiples of `window` (wh, ww); with traced sizes, True
    unless no padding is provably needed at every size the trace admits (padding by 0 is exact)."""
    return not known_zero(height % window[0], width % window[1])
