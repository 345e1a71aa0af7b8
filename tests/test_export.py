"""Capturing models whole: torch.export with dynamic batch, height and width (strict and non-strict) of
swinv2_fast's four classes and of patched transformers and timm models, and torch.fx of patched timm models.

The exported program must match eager (FP32_ATOL) at three input sizes other than the traced one: two
padded (a token grid that is not a window multiple at some stage) and one a window multiple at every
stage (the traced example is padded at stage 1 in width only; square for masked image modeling, and then
unpadded), so that a guard on the example's padding would fail one of them. The pixel sizes are
multiples of 8 (`8 * Dim`): patch 4 and one patch merging, so every stage's grid is whole, as timm's
patch embedding asserts (swinv2_fast's would pad, by an amount that is then provably 0). The traced
example has at least two windows per axis at each stage and batch 2: export specialises sizes 0 and
1 and guards derived sizes against 1, so an example with one window per axis would admit only that.

torch.fx: swinv2_fast's four classes (`symbolic_trace` with `concrete_args` for the keyword flags) and
patched timm models.

Not covered here: the fused op under export runs on CPU only under Triton's interpreter (the slow test
with attn_implementation="triton"); compiled kernels inside an exported program need a GPU. timm's
SwinTransformerV2 under strict export with dynamic sizes: timm's own patch embedding specialises the size
(test_export_patched_timm_v2_strict asserts that of the unpatched model and exports the rest). torch.fx of
patched transformers models: transformers 5 has no fx tracer (transformers.utils.fx is gone) and its
forwards branch on sizes in Python (transformers' own unpatched Swinv2 does not trace).
"""

import importlib

import pytest
import torch
from torch.export import Dim

import swinv2_fast

from _utils import FP32_ATOL, TINY, assert_close, count_patched_calls, make_pair, output_tensors, perturb_

TRACED = (2, 3, 80, 72)  # stage grids 20x18 and 10x9 at window 4: >= 2 windows per axis
# 18x14 -> 20x16 padded, 9x7 -> 12x8; 26x22, 13x11; 16x16 and 8x8, window multiples at both stages (a guard
# on the traced example's padding, traced padded or not, would refuse one kind or the other)
CHECKED = [(3, 3, 72, 56), (2, 3, 104, 88), (2, 3, 64, 64)]


def _dynamic(name="pixel_values", square=False):
    batch, k, j = Dim("batch", min=2, max=8), Dim("k", min=4, max=32), Dim("j", min=4, max=32)
    return {name: {0: batch, 2: 8 * k, 3: 8 * (k if square else j)}}


def _export_matches_eager(model, strict, dynamic_shapes=None, run=None, square=False):
    """`square`: one side size for both (masked image modeling reshapes its tokens to a square, as
    transformers' does)."""
    run = run or (lambda m, x: output_tensors(m(x)))
    torch.manual_seed(0)
    traced, checked = TRACED, CHECKED
    if square:
        traced, checked = TRACED[:3] + TRACED[2:3], [shape[:3] + shape[2:3] for shape in CHECKED]
    program = torch.export.export(
        model, (torch.randn(traced),), dynamic_shapes=dynamic_shapes or _dynamic(square=square), strict=strict
    )
    exported = program.module()
    for shape in checked:
        x = torch.randn(shape)
        with torch.no_grad():
            expected, got = run(model, x), run(exported, x)
        assert len(got) == len(expected) >= 1
        for i, (a, b) in enumerate(zip(got, expected)):
            assert a.shape == b.shape, (shape, i, a.shape, b.shape)
            assert_close(a, b, atol=FP32_ATOL, name=f"output {i} at {shape}")
    return program


def _runs_patched_step(program) -> bool:
    """Whether the exported program holds the patched step rather than the library's own: the step's eager
    path (CPU) gathers windows and calls scaled_dot_product_attention, while transformers' and timm's own
    chains roll the shifted blocks and form the scores with matmuls. (A counter of the step's calls would
    count eager runs too, and strict export does not replay its side effect; the stack traces of
    non-strict export stop at the modules' forwards.)"""
    graph = str(program.graph)
    return "aten.roll" not in graph and "scaled_dot_product_attention" in graph


def _ours(cls_name, **overrides):
    config = swinv2_fast.Swinv2Config(**dict(TINY, num_labels=3, **overrides))
    return perturb_(getattr(swinv2_fast, cls_name)(config)).eval()


# ------------------------------------------------------------------------------------ the geometry
def test_symbolic_grid_accepted_and_symbolic_window_rejected():
    """Under export the grid is symbolic and accepted; the window and shift must stay concrete, and a
    symbolic one is rejected naming the argument, the expectation and the value."""
    from swinv2_fast.kernels.geometry import WindowGeometry

    seen = {}

    class Probe(torch.nn.Module):
        def forward(self, x):
            h, w = x.shape[1], x.shape[2]
            g = WindowGeometry.from_args(grid_size=(h, w), num_heads=1, window_size=4)
            seen["symbolic"], seen["padding"] = g.is_symbolic, g.needs_padding
            with pytest.raises(
                TypeError,
                match=r"window_size must be an int or a pair of ints fixed by the "
                r"model \(not a symbolic size.*got \(4, s",
            ):
                WindowGeometry.from_args(grid_size=(h, w), num_heads=1, window_size=(4, w))
            return x * 2

    x = torch.randn(1, 8, 12)
    torch.export.export(Probe(), (x,), dynamic_shapes={"x": {1: Dim("h", min=2), 2: Dim("w", min=2)}}, strict=False)
    assert seen == {"symbolic": True, "padding": True}
    with pytest.raises(ValueError, match=r"grid_size must be positive, got \(0, 3\)"):
        WindowGeometry.from_args(grid_size=(0, 3), num_heads=1, window_size=4)


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
def test_known_zero_pads_without_a_guard(strict):
    """`known_zero`, the size test of the padding code: under export (both modes; TorchDynamo shows sizes
    to isinstance as ints) it is False unless the amount is provably 0, recording no guard, so one program
    pads every size by its (maybe 0) amount; on ints it is the plain test; on fx proxies False."""
    from swinv2_fast.kernels.geometry import known_zero

    class Probe(torch.nn.Module):
        def forward(self, x):
            pad = (4 - x.shape[1] % 4) % 4
            if not known_zero(pad):
                x = torch.nn.functional.pad(x, (0, 0, 0, pad))
            if not known_zero((2 * x.shape[1]) % 2):  # provably 0: no pad recorded
                x = torch.nn.functional.pad(x, (0, 0, 0, 1))
            return x * 2

    program = torch.export.export(
        Probe(), (torch.randn(2, 9, 3),), strict=strict, dynamic_shapes={"x": {1: Dim("h", min=2, max=64)}}
    )
    assert str(program.graph).count("aten.pad") + str(program.graph).count("constant_pad_nd") == 1
    for height in (8, 9, 12, 15):
        assert tuple(program.module()(torch.randn(2, height, 3)).shape) == (2, -(-height // 4) * 4, 3)
    assert known_zero(0, 0) and not known_zero(0, 3)
    graph = torch.fx.symbolic_trace(Probe())
    assert tuple(graph(torch.randn(2, 8, 3)).shape) == (2, 9, 3)  # fx: both paddings recorded (the 2nd by 1)


# ------------------------------------------------------------------------------- swinv2_fast models
def test_export_model_dynamic_non_strict():
    program = _export_matches_eager(_ours("Swinv2Model"), strict=False)
    assert "window_attention" not in str(program.graph)  # "auto" on CPU: the eager path, traced through


@pytest.mark.slow
@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
@pytest.mark.parametrize(
    "cls_name", ["Swinv2Model", "Swinv2ForImageClassification", "Swinv2ForMaskedImageModeling", "Swinv2Backbone"]
)
def test_export_our_classes_dynamic(cls_name, strict):
    overrides = dict(out_features=["stage1", "stage2"]) if cls_name == "Swinv2Backbone" else {}
    if cls_name == "Swinv2ForMaskedImageModeling":
        overrides["encoder_stride"] = 8  # two stages: the decoder upsamples by patch 4 * one merging
    _export_matches_eager(
        _ours(cls_name, **overrides), strict=strict, square=cls_name == "Swinv2ForMaskedImageModeling"
    )


@pytest.mark.slow
def test_export_fused_op_under_the_interpreter():
    """attn_implementation="triton": export records the custom op through its fake implementation; the
    program then runs the Triton kernels (CPU: the interpreter) at other sizes."""
    from _utils import INTERPRETER, count_fused_calls, require_kernels

    require_kernels()
    if not INTERPRETER:
        pytest.skip("runs the fused op on CPU tensors under Triton's interpreter")
    model = _ours("Swinv2Model", embed_dim=32, num_heads=[2, 2])
    model.set_attn_implementation("triton")
    with count_fused_calls() as calls:
        program = _export_matches_eager(model, strict=False)
    assert "swinv2_fast.window_attention_fused" in str(program.graph)
    assert calls["calls"] > 0


# ------------------------------------------------------------------------------- patched models
@pytest.mark.slow
@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
def test_export_patched_transformers_dynamic(strict):
    hf, _ = make_pair(
        "Swinv2ForImageClassification", num_labels=3, **{k: v for k, v in TINY.items() if k != "drop_path_rate"}
    )
    swinv2_fast.patch(hf)
    program = _export_matches_eager(
        hf, strict, run=lambda m, x: output_tensors(m(x).logits if hasattr(m(x), "logits") else m(x))
    )
    assert _runs_patched_step(program)


TIMM_SMALL = dict(
    pretrained=False, img_size=80, embed_dim=16, depths=(2, 2), num_heads=(1, 1), window_size=4, num_classes=3
)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,strict",
    [
        ("swinv2_tiny_window8_256", False),
        ("swinv2_cr_tiny_ns_224", False),
        ("swinv2_cr_tiny_ns_224", True),
    ],
    ids=["v2-non-strict", "cr-non-strict", "cr-strict"],
)
def test_export_patched_timm_dynamic(name, strict):
    """strict_img_size=False: timm's option for inputs of other sizes than img_size (its blocks then build
    the shift mask per call). v2 with strict=True: the next test."""
    timm = pytest.importorskip("timm")
    model = perturb_(timm.create_model(name, **TIMM_SMALL, strict_img_size=False)).eval()
    swinv2_fast.patch(model)
    program = _export_matches_eager(model, strict, dynamic_shapes=_dynamic("x"))
    assert _runs_patched_step(program)


class _PastPatchEmbed(torch.nn.Module):
    """timm's SwinTransformerV2.forward after its patch embedding: (B, H/4, W/4, C) in, logits out."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens):
        return self.model.forward_head(self.model.norm(self.model.layers(tokens)))


@pytest.mark.slow
def test_export_patched_timm_v2_strict():
    """Strict export of timm's SwinTransformerV2 with dynamic height and width: timm's own PatchEmbed (timm
    1.0.29; the model takes no `dynamic_img_pad`) asserts `H % patch == 0` with the size formatted into the
    message, which TorchDynamo specialises to the example's size, so timm's unpatched model fails that export
    exactly as the patched one does (asserted here, both ways: where a timm exports its own model, the
    patched model must too). Everything after the patch embedding, the patched stages, norm and head, is
    exported strict with dynamic batch, height and width and matches the whole model at other sizes."""
    timm = pytest.importorskip("timm")
    name = "swinv2_tiny_window8_256"

    def export(model):
        return torch.export.export(model, (torch.randn(TRACED),), dynamic_shapes=_dynamic("x"), strict=True)

    torch.manual_seed(0)
    plain = perturb_(timm.create_model(name, **TIMM_SMALL, strict_img_size=False)).eval()
    model = perturb_(timm.create_model(name, **TIMM_SMALL, strict_img_size=False)).eval()
    swinv2_fast.patch(model)
    try:
        export(plain)
    except torch._dynamo.exc.UserError as plain_error:
        with pytest.raises(torch._dynamo.exc.UserError) as patched_error:
            export(model)
        for error in (str(plain_error), str(patched_error.value)):
            assert (
                "specialized it to be a constant" in error
                and "timm/layers/patch_embed.py" in error
                and "should be divisible by patch size" in error
            ), error
    else:  # a timm that exports its own model: the patched model exports whole
        program = _export_matches_eager(model, strict=True, dynamic_shapes=_dynamic("x"))
        assert _runs_patched_step(program)

    batch, k, j = Dim("batch", min=2, max=8), Dim("k", min=4, max=32), Dim("j", min=4, max=32)

    def export_past_patch_embed(model):
        with torch.no_grad():
            return torch.export.export(
                _PastPatchEmbed(model),
                (model.patch_embed(torch.randn(TRACED)),),
                dynamic_shapes={"tokens": {0: batch, 1: 2 * k, 2: 2 * j}},
                strict=True,
            )

    assert not _runs_patched_step(export_past_patch_embed(plain))  # the test below tells the two apart
    program = export_past_patch_embed(model)
    assert _runs_patched_step(program)
    exported = program.module()
    for shape in CHECKED:
        x = torch.randn(shape)
        with torch.no_grad():
            assert_close(exported(model.patch_embed(x)), model(x), atol=FP32_ATOL, name=f"logits at {shape}")


# ------------------------------------------------------------------------------- torch.fx
OUR_CLASSES = ["Swinv2Model", "Swinv2ForImageClassification", "Swinv2ForMaskedImageModeling", "Swinv2Backbone"]


@pytest.mark.parametrize("cls_name", OUR_CLASSES)
def test_fx_trace_our_classes(cls_name):
    """torch.fx.symbolic_trace with the keyword arguments fixed (`concrete_args`), as for any model whose
    forward branches on its flags: the graph matches eager at the traced size and at another (padded) size
    (nothing of the traced size is recorded), records the window-attention op and each block's geometry as
    calls (built from the sizes of the call when the graph runs; the op dispatches then: fused on CUDA), and
    checks its input as the model does. Traced under torch.no_grad() in eval, where eager CPU inference
    runs blocks in pieces: the graph runs them whole (same math). transformers' own Swinv2 does not trace."""
    import inspect

    overrides = dict(out_features=["stage1", "stage2"]) if cls_name == "Swinv2Backbone" else {}
    if cls_name == "Swinv2ForMaskedImageModeling":
        overrides["encoder_stride"] = 8
    model = _ours(cls_name, **overrides)
    flags = {
        name: p.default
        for name, p in inspect.signature(model.forward).parameters.items()
        if name not in ("pixel_values", "kwargs")
    }
    with torch.no_grad():
        graph = torch.fx.symbolic_trace(model, concrete_args=flags)
    assert "window_attention" in graph.code and "WindowGeometry" in graph.code
    shapes = [(2, 3, 40, 36), (3, 3, 44, 30)]  # grids 10x9 -> 12x12, 5x5 -> 8x8; 11x8 (patch-padded) -> 12x8
    if cls_name == "Swinv2ForMaskedImageModeling":  # square (see _export_matches_eager)
        shapes = [(2, 3, 40, 40), (3, 3, 44, 44)]
    for shape in shapes:
        x = torch.randn(shape)
        with torch.no_grad():
            expected, got = output_tensors(model(x)), output_tensors(graph(x))
        assert len(got) == len(expected) >= 1
        for i, (a, b) in enumerate(zip(got, expected)):
            assert a.shape == b.shape, (shape, i, a.shape, b.shape)
            assert_close(a, b, atol=FP32_ATOL, name=f"output {i} at {shape}")
    with pytest.raises(
        ValueError,
        match=r"pixel_values must have 3 channels \(config.num_channels\), got shape "
        r"\(2, 4, 40, 40\)",
    ):
        graph(torch.randn(2, 4, 40, 40))
    with pytest.raises(TypeError, match=r"pixel_values must be a floating-point tensor, got dtype torch.int64"):
        graph(torch.zeros(2, 3, 40, 40, dtype=torch.long))


@pytest.mark.parametrize("name", ["swinv2_tiny_window8_256", "swinv2_cr_tiny_ns_224"], ids=["v2", "cr"])
def test_fx_trace_patched_timm(name):
    """torch.fx.symbolic_trace and timm's feature extractor (torchvision's create_feature_extractor with
    timm's leaf modules and functions) record the patched step as one call; the graph runs it (counted),
    matches the patched model. (Scripting such a graph, whose step compiles to the fused custom op, runs in
    timm's own test_model_forward_fx_torchscript: tests/test_peer_suites.py.)"""
    timm = pytest.importorskip("timm")
    feature_extraction = pytest.importorskip("torchvision.models.feature_extraction")
    from timm.models import get_notrace_functions, get_notrace_modules

    model = perturb_(timm.create_model(name, **{**TIMM_SMALL, "img_size": 32})).eval()
    swinv2_fast.patch(model)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        graph = torch.fx.symbolic_trace(model)
        assert "patched_window_step" in graph.code
        with count_patched_calls() as calls:
            assert_close(graph(x), expected, atol=FP32_ATOL, name="symbolic_trace")
        assert calls["calls"] == 4
        tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
        _, nodes = feature_extraction.get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
        extractor = feature_extraction.create_feature_extractor(
            model, return_nodes=[nodes[-1]], tracer_kwargs=tracer_kwargs
        )
        with count_patched_calls() as calls:
            assert_close(next(iter(extractor(x).values())), expected, atol=FP32_ATOL, name="feature extractor")
        assert calls["calls"] == 4


def test_jit_script_of_a_patched_model_raises_naming_the_cause():
    timm = pytest.importorskip("timm")
    model = timm.create_model("swinv2_tiny_window8_256", **{**TIMM_SMALL, "img_size": 32}).eval()
    swinv2_fast.patch(model)
    not_scriptable = importlib.import_module("swinv2_fast.patch").PatchedModelNotScriptable
    with pytest.raises(
        not_scriptable,
        match=r"torch.jit.script cannot compile swinv2_fast's patched .*"
        r"swinv2_fast.unpatch\(model\) first",
    ):
        torch.jit.script(model)
    swinv2_fast.unpatch(model)
    torch.jit.script(model)  # unpatched: timm's own model scripts


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:FutureWarning")
def test_jit_trace_of_a_patched_timm_model_records_timms_step():
    """torch.jit.trace of a patched timm SwinTransformerV2 ("auto") records timm's own step, which traces its
    sizes: traced at one size, the program runs at another (timm's own test of this, legacy ONNX export). The
    patched step still runs outside the trace."""
    timm = pytest.importorskip("timm")
    name = "swinv2_tiny_window8_256"
    plain = perturb_(timm.create_model(name, **TIMM_SMALL, strict_img_size=False)).eval()
    model = timm.create_model(name, **TIMM_SMALL, strict_img_size=False).eval()
    model.load_state_dict(plain.state_dict())
    swinv2_fast.patch(model)
    with torch.no_grad():
        with count_patched_calls() as calls:
            traced = torch.jit.trace(model, torch.randn(1, 3, 64, 64), check_trace=False)
        assert calls["calls"] == 0
        for size in ((48, 80), (64, 96)):
            x = torch.randn(2, 3, *size)
            assert_close(traced(x), plain(x), atol=FP32_ATOL, name=f"traced at 64x64, run at {size}")
            with count_patched_calls() as calls:
                model(x)
            assert calls["calls"] > 0
