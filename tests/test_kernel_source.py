"""The kernel files' readability contract, read from the source:
no Triton jit helper takes more than MAX_HELPER_ARGS arguments or returns more than MAX_HELPER_RETURNS values
(the geometry travels as tuples: `grid`, `layout`, `proj`, `rows`, `grads`), and every window layout that
helpers unpack is a compile-time constant where the kernels build it (a tuple built without `tl.constexpr`
reaches the helpers as runtime values: `if SHIFTED:` becomes a branch and `// WW` a division)."""

import ast
import pathlib

import pytest

KERNEL_FILES = ("kernels/triton_common.py", "kernels/triton_forward.py", "kernels/triton_backward.py")
MAX_HELPER_ARGS = 10
MAX_HELPER_RETURNS = 3
ROOT = pathlib.Path(__file__).resolve().parent.parent


def _jit_functions(path):
    tree = ast.parse((ROOT / path).read_text())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and any(
            getattr(d, "attr", None) == "jit" or getattr(d, "id", None) == "jit" for d in node.decorator_list
        ):
            yield node


def _helpers():
    return [(path, fn) for path in KERNEL_FILES for fn in _jit_functions(path) if not fn.name.endswith("_kernel")]


def _returned_values(fn):
    return max(
        (
            len(r.value.elts) if isinstance(r.value, ast.Tuple) else 1
            for r in ast.walk(fn)
            if isinstance(r, ast.Return) and r.value is not None
        ),
        default=0,
    )


def test_the_kernel_files_have_jit_helpers():
    names = {fn.name for _, fn in _helpers()}
    assert {"_window_rows", "_query_rows", "_key_rows", "_load_query_grads"} <= names, names


@pytest.mark.parametrize("path,name", [(path, fn.name) for path, fn in _helpers()])
def test_jit_helpers_take_few_arguments_and_return_few_values(path, name):
    (fn,) = [f for f in _jit_functions(path) if f.name == name]
    assert len(fn.args.args) <= MAX_HELPER_ARGS, (
        f"{path}: {name} takes {len(fn.args.args)} arguments; group them (tuples) to at most {MAX_HELPER_ARGS}"
    )
    assert _returned_values(fn) <= MAX_HELPER_RETURNS, (
        f"{path}: {name} returns {_returned_values(fn)} values; at most {MAX_HELPER_RETURNS}"
    )


LAYOUT = ("WH", "WW", "SHIFTED", "PADDED", "ROLL_THEN_PAD")


@pytest.mark.parametrize("path", KERNEL_FILES)
def test_window_layout_tuples_are_compile_time_constants(path):
    built = 0
    for fn in _jit_functions(path):
        for node in ast.walk(fn):
            value = getattr(node, "value", None)
            if (
                isinstance(node, (ast.Assign, ast.AnnAssign))
                and isinstance(value, ast.Tuple)
                and tuple(getattr(e, "id", None) for e in value.elts) == LAYOUT
            ):
                built += 1
                assert isinstance(node, ast.AnnAssign) and ast.unparse(node.annotation) == "tl.constexpr", (
                    f"{path}:{node.lineno}: {fn.name} builds the window layout without tl.constexpr"
                )
        for arg in fn.args.args:
            if arg.arg == "layout":
                assert arg.annotation is not None and ast.unparse(arg.annotation) == "tl.constexpr", (
                    f"{path}: {fn.name} takes layout without tl.constexpr"
                )
    kernels = [fn.name for fn in _jit_functions(path) if fn.name.endswith("_kernel")]
    assert built or not kernels, f"{path}: no kernel builds the window layout"
