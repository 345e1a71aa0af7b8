"""The dispatch table of swinv2_fast.functional, each rule from both sides: which implementation a call gets
("auto", "triton", "eager"), and where "triton" refuses. The CUDA rules are checked without a GPU on tensors
that report a CUDA device (a Tensor subclass overriding `is_cuda` and `device`; resolve_implementation reads
nothing else of the device). No kernel runs here."""

import subprocess
import sys

import pytest
import torch

from swinv2_fast import functional, window_attention
from swinv2_fast.kernels import PAD_THEN_ROLL, ROLL_THEN_PAD, WindowGeometry, tiles

from _utils import require_kernels, tk


class _ReportsCuda(torch.Tensor):
    """A CPU tensor that answers like a CUDA tensor to the dispatch's device checks."""

    @property
    def is_cuda(self):
        return True

    @property
    def device(self):
        return torch.device("cuda", 0)


def _qkv(head_dim=32, heads=2, dtype=torch.float32, cuda=True, grad=False):
    t = torch.zeros(1, 16, 3 * heads * head_dim, dtype=dtype, requires_grad=grad)
    return t.as_subclass(_ReportsCuda) if cuda else t


def _resolve(implementation, qkv, heads=2, **kwargs):
    return functional.resolve_implementation(implementation, qkv, heads, grad_inputs=(qkv,), **kwargs)


@pytest.fixture
def kernel_module():
    """The kernels' policy module (its backward-tile table decides the fp32 rule; its INTERPRETED the CPU
    rule), with Triton needed for the dispatch to pick the kernels."""
    if tk is None:
        require_kernels()
    return tiles


def test_auto_on_cuda_takes_the_kernels_where_they_serve(kernel_module):
    # every head dim from 1 to 128: powers of two from 16 in whole channel tiles, the others masked
    for head_dim in (1, 8, 10, 16, 24, 30, 32, 48, 64, 96, 127, 128):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            assert _resolve("auto", _qkv(head_dim, heads=1, dtype=dtype), heads=1) == "triton", (head_dim, dtype)
    # gradients: fused where the backward has a build (every 16-bit head dim, fp32 up to 32)
    assert _resolve("auto", _qkv(32, grad=True)) == "triton"
    assert _resolve("auto", _qkv(16, grad=True)) == "triton"
    assert _resolve("auto", _qkv(30, grad=True)) == "triton"  # Swin2SR's head dims
    assert _resolve("auto", _qkv(10, grad=True)) == "triton"
    assert _resolve("auto", _qkv(96, dtype=torch.float16, grad=True)) == "triton"
    assert _resolve("auto", _qkv(128, dtype=torch.bfloat16, grad=True)) == "triton"
    assert _resolve("auto", _qkv(64, dtype=torch.float16, grad=True)) == "triton"


def test_auto_on_cuda_takes_eager_where_the_kernels_do_not_serve(kernel_module):
    assert _resolve("auto", _qkv(160, heads=1), heads=1) == "eager"  # beyond the kernels' largest head dim
    assert _resolve("auto", _qkv(129, heads=1, dtype=torch.float16), heads=1) == "eager"
    assert _resolve("auto", _qkv(48, grad=True)) == "eager"  # fp32 backward: a 64-channel tile
    assert _resolve("auto", _qkv(32, dtype=torch.float64)) == "eager"
    assert _resolve("auto", _qkv(64, grad=True)) == "eager"  # fp32 backward: no spill-free build
    assert _resolve("auto", _qkv(128, grad=True)) == "eager"
    with torch.no_grad():  # no gradient will be asked for: the forward serves
        assert _resolve("auto", _qkv(64, grad=True)) == "triton"
    assert _resolve("auto", _qkv(32), return_attention_probs=True) == "eager"
    assert _resolve("auto", _qkv(32), dropout_p=0.1) == "eager"


def test_auto_on_cuda_without_triton_is_eager(monkeypatch):
    monkeypatch.setattr(functional, "triton_available", lambda: False)
    assert _resolve("auto", _qkv(32)) == "eager"


def test_auto_on_cpu_is_eager_even_under_the_interpreter(kernel_module, monkeypatch):
    for interpreted in (True, False):
        monkeypatch.setattr(kernel_module, "INTERPRETED", interpreted)
        assert _resolve("auto", _qkv(32, cuda=False)) == "eager"


def test_eager_is_eager_everywhere():
    for cuda in (True, False):
        assert _resolve("eager", _qkv(32, cuda=cuda)) == "eager"


def test_triton_on_cuda_serves_or_raises(kernel_module):
    assert _resolve("triton", _qkv(32)) == "triton"
    assert _resolve("triton", _qkv(128, dtype=torch.float16, grad=True)) == "triton"
    assert _resolve("triton", _qkv(32, dtype=torch.bfloat16)) == "triton"  # bf16 compiles on a GPU
    assert _resolve("triton", _qkv(64)) == "triton"  # fp32 forward without gradients
    with pytest.raises(ValueError, match="float64 runs on the eager path"):
        _resolve("triton", _qkv(32, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"no spill-free build for torch\.float32 with head_dim 64"):
        _resolve("triton", _qkv(64, grad=True))
    with pytest.raises(ValueError, match=r"supports head_dim 1 to 128, got 160"):
        _resolve("triton", _qkv(160, heads=1), heads=1)
    assert _resolve("triton", _qkv(24)) == "triton"  # masked in a 32-channel tile
    assert _resolve("triton", _qkv(10, dtype=torch.float16, grad=True)) == "triton"
    # by design the eager path's, whatever was asked
    assert _resolve("triton", _qkv(32), return_attention_probs=True) == "eager"
    assert _resolve("triton", _qkv(32), dropout_p=0.1) == "eager"
    assert _resolve("triton", _qkv(32), dropout_p=0.0) == "triton"


def test_triton_on_cpu_needs_the_interpreter(kernel_module, monkeypatch):
    monkeypatch.setattr(kernel_module, "INTERPRETED", True)
    assert _resolve("triton", _qkv(32, cuda=False)) == "triton"
    assert _resolve("triton", _qkv(64, cuda=False, grad=True)) == "triton"  # every fp32 build interprets
    assert _resolve("triton", _qkv(32, cuda=False, dtype=torch.float64)) == "triton"  # gradcheck dtype
    with pytest.raises(ValueError, match="bfloat16 CPU tensors"):
        _resolve("triton", _qkv(32, cuda=False, dtype=torch.bfloat16))
    monkeypatch.setattr(kernel_module, "INTERPRETED", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _resolve("triton", _qkv(32, cuda=False))


def test_triton_on_another_device_raises(kernel_module):
    qkv = torch.zeros(1, 16, 192, device="meta")
    with pytest.raises(RuntimeError, match=r"runs on CUDA .* got meta"):
        _resolve("triton", qkv)


def test_triton_without_triton_raises(monkeypatch):
    monkeypatch.setattr(functional, "triton_available", lambda: False)
    for cuda in (True, False):
        with pytest.raises(RuntimeError, match="needs Triton"):
            _resolve("triton", _qkv(32, cuda=cuda))


def test_unknown_implementation_is_rejected():
    with pytest.raises(ValueError, match=r"implementation must be one of \('auto', 'triton', 'eager'\)"):
        _resolve("fast", _qkv(32))


def test_which_calls_the_fused_backward_serves_on_a_gpu(kernel_module):
    """The rule behind "auto" and "triton" on CUDA tensors: fp64 never; fp32 with gradients for head_dim up
    to 32 (channel tiles of 16 and 32); fp16/bf16 always."""

    def serves(dtype, head_dim, grad):
        qkv = torch.zeros(1, 4, 3 * head_dim, dtype=dtype, requires_grad=grad)
        return functional._fused_serves(qkv, 1, (qkv,))

    assert not serves(torch.float64, 32, False)
    assert serves(torch.float32, 128, False) and serves(torch.float32, 32, True) and serves(torch.float32, 16, True)
    assert serves(torch.float32, 30, True) and serves(torch.float32, 10, True) and serves(torch.float32, 1, True)
    assert not serves(torch.float32, 33, True) and not serves(torch.float32, 64, True)
    assert not serves(torch.float32, 128, True)
    assert serves(torch.float16, 128, True) and serves(torch.bfloat16, 64, True)
    with torch.no_grad():
        assert serves(torch.float32, 128, True)  # no gradient will be asked for
    # the gradient of any differentiable input counts, not only qkv's
    qkv, table = torch.zeros(1, 4, 3 * 64), torch.zeros(1, 4, 4, requires_grad=True)
    assert not functional._fused_serves(qkv, 1, (qkv, None, None, table))


# ------------------------------------------------------------------------------------ bounds of the op
def _op_inputs(heads=2, head_dim=16, grid=(8, 8), window=4):
    C, N = heads * head_dim, window * window
    return (torch.randn(1, grid[0] * grid[1], 3 * C), None, torch.zeros(heads, 1, 1), torch.zeros(heads, N, N)), dict(
        grid_size=grid, num_heads=heads, window_size=window
    )


@pytest.mark.parametrize("dropout_p,ok", [(0.0, True), (0.999, True), (1.0, False), (-0.1, False)])
def test_dropout_p_bounds(dropout_p, ok):
    tensors, kwargs = _op_inputs()
    call = lambda: window_attention(*tensors, dropout_p=dropout_p, implementation="eager", **kwargs)  # noqa: E731
    if ok:
        assert call().shape == (1, 64, 32)
    else:
        with pytest.raises(ValueError, match=r"dropout_p must lie in \[0, 1\), got"):
            call()


@pytest.mark.parametrize(
    "num_heads,error,pattern",
    [  # the count by WindowGeometry, the division by the tensors
        (0, ValueError, r"num_heads must be at least 1, got 0"),
        (-2, ValueError, r"num_heads must be at least 1, got -2"),
        (3, ValueError, r"got 96 with num_heads=3"),
        (2.0, TypeError, r"num_heads must be an int, got float"),
    ],
)
def test_num_heads_bounds(num_heads, error, pattern):
    tensors, kwargs = _op_inputs()
    with pytest.raises(error, match=pattern):
        window_attention(*tensors, **dict(kwargs, num_heads=num_heads))


@pytest.mark.parametrize(
    "grid_size,pattern",
    [
        ((8, 0), r"grid_size"),
        ((0, 0), r"grid_size"),
        ((8, -8), r"grid_size"),
        ((8, 8, 1), r"grid_size"),
    ],
)
def test_grid_bounds(grid_size, pattern):
    tensors, kwargs = _op_inputs()
    with pytest.raises((ValueError, TypeError), match=pattern):
        window_attention(*tensors, **dict(kwargs, grid_size=grid_size))


def test_package_imports_and_runs_eager_without_triton(tmp_path):
    """A machine without Triton: import works, eager and auto run, triton raises a clear error."""
    script = tmp_path / "no_triton.py"
    script.write_text(
        "import sys\n"
        "import torch  # torch probes for triton itself; block it for what follows\n"
        "for name in [m for m in sys.modules if m == 'triton' or m.startswith('triton.')]:\n"
        "    del sys.modules[name]\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'triton' or name.startswith('triton.'):\n"
        "            raise ImportError('triton blocked for this test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import swinv2_fast\n"
        "cfg = swinv2_fast.Swinv2Config(image_size=32, window_size=4, embed_dim=16, depths=[2], num_heads=[1])\n"
        "m = swinv2_fast.Swinv2Model(cfg).eval()\n"
        "print(tuple(m(torch.randn(1, 3, 32, 32)).last_hidden_state.shape))\n"
        "m.set_attn_implementation('triton')\n"
        "try:\n"
        "    m(torch.randn(1, 3, 32, 32))\n"
        "except RuntimeError as e:\n"
        "    print('raised:', e)\n"
        "from swinv2_fast.kernels import tiles  # the kernels' policy answers too (the Triton-dependent rules: no)\n"
        "print('window 7 fused:', tiles.fused_backward_applies(49, 32, torch.bfloat16))\n"
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "(1, 64, 16)" in result.stdout
    assert "raised: implementation='triton' needs Triton" in result.stdout
    assert "window 7 fused: False" in result.stdout


def test_whole_window_programs_serve_windows_12_and_16_at_head_dim_32_in_16_bit_on_sm_90():
    for dtype in (torch.bfloat16, torch.float16):
        assert tiles.forward_window_tiles(144, 32, dtype, 90) == (64, 128, 16, 4)
        assert tiles.forward_window_tiles(256, 32, dtype, 90) == (64, 128, 128, 4)
    for n, head_dim, dtype, arch in [
        (144, 32, torch.bfloat16, 80),  # mma.sync: every warp would hold the keys (spills)
        (144, 32, torch.bfloat16, 100),  # not in the spill gate
        (144, 32, torch.bfloat16, 120),
        (144, 32, torch.float32, 90),
        (144, 16, torch.bfloat16, 90),
        (256, 32, torch.bfloat16, 80),
        (256, 64, torch.bfloat16, 90),
        (64, 32, torch.bfloat16, 90),
        (576, 32, torch.bfloat16, 90),
    ]:
        assert tiles.forward_window_tiles(n, head_dim, dtype, arch) is None, (n, head_dim, dtype, arch)
    assert tiles.register_cap(144, 32, torch.bfloat16, arch=90, whole_window=True) == tiles.MAXNREG
    assert tiles.register_cap(256, 32, torch.bfloat16, arch=90, whole_window=True) == tiles.MAXNREG
    # the row-block programs (a record): capped at 128 with Triton 3.8 or later, whose builds fit it
    capped = 128 if tiles._triton_release() >= (3, 8) else tiles.MAXNREG
    assert tiles.register_cap(256, 32, torch.bfloat16, arch=90) == capped
    assert tiles.forward_query_tail(144, 64) == 16
    assert tiles.forward_query_tail(144, 128) == 16
    assert tiles.forward_query_tail(256, 64) == 0
    assert tiles.forward_query_tail(150, 64) == 0  # 22 rows: no power of two


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "grid,window,shift,order",
    [
        ((24, 24), 12, 6, PAD_THEN_ROLL),
        ((30, 26), 12, 6, ROLL_THEN_PAD),
        ((30, 26), 12, 6, PAD_THEN_ROLL),
        ((12, 36), 12, (0, 6), PAD_THEN_ROLL),
        ((40, 36), 16, 8, ROLL_THEN_PAD),
    ],
)
def test_shift_masked_tables_are_the_table_plus_the_reference_mask(grid, window, shift, order, dtype, kernel_module):
    """Each border window's table (by its kind: last window row, last column, corner) is the table plus that
    window's shift mask as the reference builds it (reference.shift_mask), in the table's dtype."""
    from swinv2_fast.kernels.launch import launch_dims
    from swinv2_fast.kernels.reference import shift_mask, window_layout

    heads, mask_value = 2, -100.0
    geometry = WindowGeometry.from_args(grid_size=grid, num_heads=heads, window_size=window, shift_size=shift)
    args = geometry.as_op_args()
    qkv = torch.empty(1, grid[0] * grid[1], 3 * heads * 32)
    dims = launch_dims(qkv, *args[:5])
    n = dims.N
    table = torch.randn(heads, n, n).to(dtype)
    masked = tk.shift_masked_tables(table, dims, mask_value)
    assert masked.shape == (3, heads, n, n) and masked.dtype == dtype
    mask = shift_mask(window_layout(grid, args[2], args[3], order), mask_value, dtype)
    num_wy, num_wx = dims.NUM_WINDOWS // dims.NUM_WX, dims.NUM_WX
    kinds = 0
    for i_w in range(dims.NUM_WINDOWS):
        last_row, last_column = i_w // num_wx == num_wy - 1, i_w % num_wx == num_wx - 1
        if last_row or last_column:
            kind = int(last_row) + 2 * int(last_column) - 1
            kinds |= 1 << kind
            torch.testing.assert_close(masked[kind], (table + mask[i_w]).to(dtype), rtol=0, atol=0)
        else:
            assert not mask[i_w].any(), "a window off the border has a shift mask"
    assert kinds == (0b111 if num_wy > 1 else 0b101), "every kind of border window checked"


def test_a_forward_override_runs_row_block_programs(monkeypatch):
    """A tile sweep's override (or record) for the forward sets its tiles, register budget and stages: the
    row-block programs run them. An override of None masks a record: the whole-window programs again."""
    from swinv2_fast.kernels.geometry import WindowGeometry
    from swinv2_fast.kernels.launch import launch_dims, launch_flags

    qkv = torch.empty(2, 48 * 48, 3 * 64, dtype=torch.bfloat16, device="meta")
    geometry = WindowGeometry.from_args(grid_size=(48, 48), num_heads=2, window_size=12, shift_size=6)
    grid, heads, window, shift, order = geometry.as_op_args()[:5]
    dims = launch_dims(qkv, grid, heads, window, shift, order)
    flags = launch_flags(qkv, None, order, 32, dims)
    assert flags["WHOLE_WINDOW"] and (flags["BLOCK_M"], flags["BLOCK_N"], flags["BLOCK_T"]) == (64, 128, 16)
    monkeypatch.setitem(tiles.TILE_OVERRIDES, "bf16/hd32/N144/fwd", (64, 32, 4, 200, 2))
    assert tiles.forward_window_tiles(144, 32, torch.bfloat16, 90) is None
    flags = launch_flags(qkv, None, order, 32, dims)
    assert "WHOLE_WINDOW" not in flags and "BLOCK_T" not in flags
    assert (flags["BLOCK_M"], flags["BLOCK_N"], flags["num_warps"], flags["maxnreg"], flags["num_stages"]) == (
        64,
        32,
        4,
        200,
        2,
    )
    monkeypatch.setitem(tiles.TILE_OVERRIDES, "bf16/hd32/N144/fwd", None)
    assert tiles.forward_window_tiles(144, 32, torch.bfloat16, 90) == (64, 128, 16, 4)
