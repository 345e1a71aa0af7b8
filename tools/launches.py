"""Record and compile the kernels' launches without a GPU: the layer the compile check, the cost report and the
tile sweep share (tools/compile_check.py, tools/cost.py, tools/sweep.py).

- The cases: the kernels, dtypes, head dims, windows and geometries the gate compiles (`Spec`, `GEOMETRIES`,
  ...) and the reference launch of each window (`reference_launches`).
- Recording: the host functions (`window_attention_triton_forward` / `_backward`) run as they would on a GPU,
  on meta tensors, with each `*_kernel` global of the Triton files replaced by a recorder
  (`recording_launches`, `replaced_kernels`), so the grid, the arguments and the options are exactly a real
  launch's.
- Compiling: each recorded launch made what the host makes on the target (`for_arch`: the register cap, sm_80's
  table-kernel tiles), specialised by Triton's own binder for it (`specialise`: integers
  divisible by 16 or equal to 1, 16-byte aligned pointers, as the JIT does at run time) and compiled with
  `triton.compile` down to the cubin the runtime would load (`compile_launch`); `cuobjdump` (shipped in the
  Triton wheel) lists its resource usage and SASS (`cubin_listings`), read by `resource_usage` (registers,
  spill bytes) and `parse_sass`.
- `run_spawned`: work in fresh processes with the interpreter off.

It imports the Triton files (the launchers it records); Triton's compiler internals are imported where a
launch is specialised or compiled.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import re
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

from swinv2_fast.kernels import triton_backward, triton_forward
from swinv2_fast.kernels.geometry import PAD_THEN_ROLL, WindowGeometry
from swinv2_fast.kernels.tiles import (
    MAXNREG,
    TABLE_PROGRAMS,
    backward_kernels,
    block_config,
    forward_window_tiles,
    launch_stages,
    program_register_budget,
    register_cap,
    table_kernel_tiles,
    window_groups,
)

# ------------------------------------------------------------------------------------------- the cases
ARCHS = (80, 90)

DTYPES = ("fp32", "fp16", "bf16")  # fp64 runs under the interpreter only (gradcheck)
KERNELS = ("fwd", "bwd_fused", "bwd_rows", "bwd_stats", "bwd_dq", "bwd_dkdv", "bwd_dbias")
WINDOW_SIZES = (7, 8, 12, 16, 24)  # N = 49, 64, 144, 256, 576
PUBLISHED_HEAD_DIM = 32  # every published Swin V2 model's
# the full gate: the head dims of whole channel tiles, and masked ones (below 16, and between powers of two)
GATE_HEAD_DIMS = (10, 16, 24, 30, 32, 64, 96, 128)


def _grid(window: int, padded: bool) -> int:
    base = 56 if window == 7 else 64  # windows 12 and 24 pad a 64x64 grid to 72
    if padded:
        return base if base % window else base + window // 2
    return base if base % window == 0 else 48 * window // 12  # 48 = 4 windows of 12, 2 of 24


# geometry name -> (padded grid?, shifted?, bias?, pad order): every flag combination the kernels specialise on
GEOMETRIES = {
    "shift+bias": (False, True, True, "pad_then_roll"),
    "noshift+bias": (False, False, True, "pad_then_roll"),
    "pad+shift+bias+roll_then_pad": (True, True, True, "roll_then_pad"),
    "pad+shift+bias": (True, True, True, "pad_then_roll"),
    "pad+shift": (True, True, False, "pad_then_roll"),
    "pad+shift+roll_then_pad": (True, True, False, "roll_then_pad"),
    "pad+bias": (True, False, True, "pad_then_roll"),
    "pad+bias+roll_then_pad": (True, False, True, "roll_then_pad"),
    "pad+roll_then_pad": (True, False, False, "roll_then_pad"),
    "pad": (True, False, False, "pad_then_roll"),
}
PUBLISHED_GEOMETRIES = ("shift+bias", "noshift+bias", "pad+shift+bias", "pad+shift+bias+roll_then_pad")
# transformers' Swin2SR: head_dim 30 (embed_dim 180, 6 heads) and 10 (the lightweight model's 60), window 8 on
# a grid padded to whole windows before the first block (no padding inside the attention)
SWIN2SR_HEAD_DIMS = (30, 10)
SWIN2SR_WINDOWS = (8,)
SWIN2SR_GEOMETRIES = ("shift+bias", "noshift+bias")


class Spec(NamedTuple):
    kernel: str
    dtype: str
    head_dim: int
    window: int
    geometry: str


def _torch_dtype(name):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}[name]


def launched(kernel: str, window: int, head_dim: int, dtype: str, padded: bool = False) -> bool:
    """Whether the launchers run `kernel` at windows of `window` x `window`, head_dim and the projection dtype,
    on a padded grid or not (every gradient asked for)."""
    return kernel == "fwd" or kernel in backward_kernels(window * window, head_dim, _torch_dtype(dtype), padded)


REFERENCE_BATCH = 8
REFERENCE_HEADS = 4
REFERENCE_HEAD_DIM = 32  # the published Swin V2 models'


class Launch(NamedTuple):
    kernel: str  # short name: fwd, bwd_stats, ...
    fn: Any  # the JITFunction (Triton's internals, read by attribute: signature, params, _pack_args)
    grid: Tuple[int, ...]
    kwargs: dict


# ------------------------------------------------------------------------------------ the reference launch
def _short(name: str) -> str:
    return name[len("_window_attention_") : -len("_kernel")]


@contextlib.contextmanager
def replaced_kernels(wrap: Callable):
    """Replace every `*_kernel` global of the kernel modules by wrap(name, kernel), an object launched as the
    kernel is (`kernel[grid](**kwargs)`); restored after."""
    saved = {
        (module, name): fn
        for module in (triton_forward, triton_backward)
        for name, fn in vars(module).items()
        if name.endswith("_kernel")
    }
    try:
        for (module, name), fn in saved.items():
            setattr(module, name, wrap(name, fn))
        yield
    finally:
        for (module, name), fn in saved.items():
            setattr(module, name, fn)


@contextlib.contextmanager
def recording_launches():
    """Replace every `*_kernel` global of the kernel modules by a recorder of (grid, kwargs); restored after."""
    launches: List[Launch] = []

    class _Recorder:
        def __init__(self, name, fn):
            self.name, self.fn = name, fn

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                if args:
                    raise TypeError("the cost model records keyword launches only")
                launches.append(Launch(_short(self.name), self.fn, tuple(grid), kwargs))

            return launch

    with replaced_kernels(_Recorder):
        yield launches


def reference_geometry(window: int):
    grid = 56 if window == 7 else 64
    return dict(
        grid_size=(grid, grid),
        num_heads=REFERENCE_HEADS,
        window_size=(window, window),
        shift_size=(window // 2, window // 2),
    )


def reference_launches(
    window: int,
    dtype: str,
    head_dim: int = REFERENCE_HEAD_DIM,
    geometry: Optional[dict] = None,
    bias: bool = True,
    pad_order: Optional[str] = None,
    backward: bool = True,
    table_dtype: Optional[str] = None,
    batch: int = REFERENCE_BATCH,
) -> Dict[str, List[Launch]]:
    """The kernels' launches of one forward and (with `backward`) one full backward, on meta tensors: by
    default at the reference shape of the window (batch 8, 4 heads, a q/k/v bias, transformers' order), with
    the position-bias table in the projection's dtype (what a model in that dtype passes; "fp32" for the
    table torch.autocast passes beside a 16-bit projection). Each
    kernel is launched once, but twice on a shifted grid (the windows off the shifted border, without the shift
    mask, and the border: `window_sets`; the fused backward once on a padded grid); a kernel's cost is that of
    its launches."""
    import torch

    geometry = dict(geometry or reference_geometry(window))
    geometry.setdefault("num_heads", REFERENCE_HEADS)
    geometry["pad_order"] = pad_order or PAD_THEN_ROLL
    tdt = _torch_dtype(dtype)
    B, heads, (gh, gw) = batch, geometry["num_heads"], geometry["grid_size"]
    C = heads * head_dim
    meta: Dict[str, Any] = dict(device="meta")
    qkv = torch.empty(B, gh * gw, 3 * C, dtype=tdt, **meta)
    qkv_bias = torch.empty(3 * C, dtype=tdt, **meta) if bias else None
    logit_scale = torch.empty(heads, 1, 1, **meta)
    table = torch.empty(heads, window * window, window * window, dtype=_torch_dtype(table_dtype or dtype), **meta)
    g = WindowGeometry.from_args(**geometry)
    with recording_launches() as launches:
        out = triton_forward.window_attention_triton_forward(qkv, qkv_bias, logit_scale, table, *g.as_op_args())
        if backward:
            triton_backward.window_attention_triton_backward(
                torch.empty_like(out), qkv, qkv_bias, logit_scale, table, *g.as_op_args()
            )
    found: Dict[str, List[Launch]] = {}
    for launch in launches:
        found.setdefault(launch.kernel, []).append(launch)
    # one launch of each kernel the launchers launch for this window; on a shifted grid the windows off its
    # border and the border apart
    expected = ("fwd",) + (backward_kernels(window * window, head_dim, tdt, g.needs_padding) if backward else ())
    counts = {k: len(v) for k, v in found.items()}
    split = ("fwd", "bwd_fused", "bwd_rows", "bwd_stats", "bwd_dq", "bwd_dkdv", "bwd_dbias")
    if sorted(found) != sorted(expected) or any(c > (2 if k in split else 1) for k, c in counts.items()):
        raise RuntimeError(
            f"expected one launch of each of {expected} (two on a shifted grid), "
            f"recorded {[launch.kernel for launch in launches]}"
        )
    return found


# ----------------------------------------------------------------------------------------- compiling
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def program_registers(registers: int, num_warps: int) -> int:
    """The registers of its SM's register file a program of num_warps warps takes at `registers` per thread:
    allocated per warp in units of 256."""
    return cdiv(max(registers, 1) * 32, 256) * 256 * num_warps


def for_arch(launch: Launch, arch: int) -> Launch:
    """The launch as the host makes it on sm_<arch>: recorded on meta tensors, it was made for sm_90 (off CUDA
    the launch's arch is 90). The register cap depends on the target, and so do the table kernel's tiles and
    warps on sm_80 (`table_kernel_tiles`), with its grid and groups of windows. Asked again of its result, it
    returns the same launch."""
    a = dict(launch.kwargs)
    grid = launch.grid
    if launch.kernel == "fwd" and a.get("WHOLE_WINDOW"):
        a, grid = _forward_for_arch(a, grid, arch)
    a["maxnreg"] = register_cap(
        a["N"], a["HEAD_DIM"], a["QKV"].dtype, launch.kernel != "fwd", arch, a["PADDED"], a.get("WHOLE_WINDOW", False)
    )
    if launch.kernel == "bwd_rows":  # its own budget, whatever caps the other backward kernels
        a["maxnreg"] = MAXNREG
    if launch.kernel == "bwd_fused":  # over 16 warps (fp32), what one SM holds
        a["maxnreg"] = program_register_budget(a["num_warps"], a["maxnreg"])
    if launch.kernel == "bwd_dbias":  # its tiles, then its groups of windows, as the host sizes them
        a["BLOCK_M"], a["BLOCK_N"], a["num_warps"] = table_kernel_tiles(
            a["N"], a["BLOCK_M"], a["BLOCK_N"], a["num_warps"], arch
        )
        num_tiles, heads = cdiv(a["N"], a["BLOCK_M"]) * cdiv(a["N"], a["BLOCK_N"]), grid[1]
        all_pairs = a["QKV"].shape[0] * a["NUM_WINDOWS"]
        a["WINDOWS_PER_GROUP"], groups = window_groups(all_pairs, a["NUM_BW"], num_tiles * heads, TABLE_PROGRAMS)
        grid = (num_tiles, heads, groups)
    return launch._replace(kwargs=a, grid=grid)


def _forward_for_arch(a: dict, grid: Tuple[int, ...], arch: int) -> Tuple[dict, Tuple[int, ...]]:
    """A whole-window forward launch (recorded for sm_90) as the host makes it on sm_<arch>: the same where
    `forward_window_tiles` serves the arch, else the row-block programs on `block_config`'s tiles, with their
    stages, windows per program and grid."""
    n, head_dim, dtype = a["N"], a["HEAD_DIM"], a["QKV"].dtype
    if forward_window_tiles(n, head_dim, dtype, arch) is not None:
        return a, grid
    for key in ("WHOLE_WINDOW", "BLOCK_T", "M_TAIL", "num_stages"):
        a.pop(key, None)
    a["BLOCK_M"], a["BLOCK_N"], a["num_warps"] = block_config(n, head_dim, dtype, False, arch)
    a["MASK_IN_TABLE"] = triton_forward.mask_in_table(n, a, a["WINDOW_SET"])
    if a["POSITION_BIAS"].dim() == 4 and not a["MASK_IN_TABLE"]:  # the border tables (shift mask added): one's shape
        a["POSITION_BIAS"] = a["POSITION_BIAS"][0]  # (meta tensors: only the shape, dtype and strides are read)
    stages = launch_stages(n, head_dim, dtype, False, arch)
    if stages is not None:
        a["num_stages"] = stages
    row_blocks = cdiv(n, a["BLOCK_M"])
    sms = triton_forward._SMS_OFF_CUDA  # the SMs the recorded launch was sized for
    a["WINDOWS_PER_PROGRAM"] = triton_forward.windows_per_program(a["NUM_BW"], row_blocks, grid[1], sms)
    return a, (cdiv(a["NUM_BW"], a["WINDOWS_PER_PROGRAM"]) * row_blocks, grid[1])


def specialise(launch: Launch, arch: int):
    """(signature, constexprs, attrs, options) exactly as the JIT builds them for this launch on `arch`
    (`for_arch`)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    launch = for_arch(launch, arch)
    fn = launch.fn
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(**launch.kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, options, bound, specialization, options)
    return signature, constexprs, attrs, options


def _nvidia_bin(tool: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


def cubin_listings(cubin: bytes) -> Tuple[str, str]:
    """`cuobjdump -res-usage` and `-sass` of a cubin (the cuobjdump that ships in the Triton wheel)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as fh:
            fh.write(cubin)
        usage, sass = (
            subprocess.run([_nvidia_bin("cuobjdump"), flag, path], capture_output=True, text=True, check=True).stdout
            for flag in ("-res-usage", "-sass")
        )
        return usage, sass


def compile_launch(launch: Launch, arch: int):
    """The compiled kernel, its `cuobjdump -res-usage` and `-sass` texts."""
    import triton
    from triton.backends.compiler import GPUTarget

    signature, constexprs, attrs, options = specialise(launch, arch)
    compiled = triton.compile(
        triton.compiler.ASTSource(fn=launch.fn, signature=signature, constexprs=constexprs, attrs=attrs),
        target=GPUTarget("cuda", arch, 32),
        options=options.__dict__,
    )
    usage, sass = cubin_listings(compiled.asm["cubin"])
    return compiled, usage, sass


def resource_usage(usage: str, sass: str) -> Tuple[int, int]:
    """(registers, spill bytes): registers from `cuobjdump -res-usage`; spills are the bytes the SASS moves
    to and from local memory (STL and LDL, per thread, each instruction once), where spilled registers
    live. A stack frame the SASS never touches (ptxas sometimes reserves one) is not a spill."""
    reg = re.search(r"REG:(\d+)", usage)
    assert reg is not None, "no REG: in the cuobjdump -res-usage listing"  # cuobjdump always lists it
    registers = int(reg.group(1))
    spills = 0
    for ins in parse_sass(sass):
        if ins.opcode.split(".")[0] in ("STL", "LDL"):
            width = re.search(r"\.(64|128|U8|S8|U16|S16)\b", ins.opcode)
            spills += {"64": 8, "128": 16, "U8": 1, "S8": 1, "U16": 2, "S16": 2}[width.group(1)] if width else 4
    return registers, spills


# ----------------------------------------------------------------------------------- counting the SASS
_SASS_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")


class Instruction(NamedTuple):
    address: int
    predicated: bool
    opcode: str
    operands: str


def parse_sass(sass: str) -> List[Instruction]:
    """The instructions of the (single) function in `cuobjdump -sass` text, in address order."""
    out = []
    for line in sass.splitlines():
        match = _SASS_LINE.match(line)
        if match:
            address, predicate, opcode, operands = match.groups()
            predicated = predicate is not None and predicate.strip() not in ("@PT",)
            out.append(Instruction(int(address, 16), predicated, opcode, operands.strip()))
    if not out:
        raise ValueError("no SASS instructions found")
    return out


# ------------------------------------------------------------------------------------------- processes
def run_spawned(fn, work, jobs: int) -> list:
    """fn over work in fresh processes. Compiling never touches a GPU. Fresh (spawned) workers with the
    interpreter off import the kernels as compilable functions, whatever this process imported under
    TRITON_INTERPRET=1."""
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            return list(pool.map(fn, work))
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous
