"""Every swinv2_fast class against transformers' class on identical random weights."""

import pytest
import torch
import transformers

import swinv2_fast

from _utils import CONFIGS, LOW_PRECISION_FACTOR, LOW_PRECISION_FLOOR, assert_close, make_pair

INPUTS = {
    "w7": [(2, 56, 56), (1, 61, 45)],
    "w8": [(2, 64, 64), (1, 70, 50), (2, 37, 37)],
    "w12-pretrained": [(1, 96, 96), (2, 100, 90)],
    "w16": [(1, 64, 64), (2, 66, 71)],
}
CASES = [
    pytest.param(name, shape, id=f"{name}-B{shape[0]}-{shape[1]}x{shape[2]}")
    for name in CONFIGS
    for shape in INPUTS[name]
]


def compare_outputs(ours, theirs, prefix=""):
    assert list(ours.keys()) == list(theirs.keys()), f"{prefix}fields {list(ours.keys())} != {list(theirs.keys())}"
    for key in theirs:
        a, b = ours[key], theirs[key]
        if isinstance(b, torch.Tensor):
            assert_close(a, b, name=prefix + key)
        else:
            assert len(a) == len(b), f"{prefix}{key}: {len(a)} entries vs {len(b)}"
            for i, (x, y) in enumerate(zip(a, b)):
                assert_close(x, y, name=f"{prefix}{key}[{i}]")


@pytest.mark.parametrize("name,shape", CASES)
def test_image_classification_matches_transformers(name, shape):
    hf, ours = make_pair("Swinv2ForImageClassification", **CONFIGS[name])
    x = torch.randn(shape[0], 3, shape[1], shape[2])
    with torch.no_grad():
        expected = hf(x, output_hidden_states=True, output_attentions=True)
        actual = ours(x, output_hidden_states=True, output_attentions=True)
        compare_outputs(actual, expected)
        # Without attentions the fused (SDPA) branch runs: same logits.
        assert_close(ours(x).logits, hf(x).logits, name="logits without output_attentions")


@pytest.mark.parametrize("name,shape", CASES[:4])
def test_model_matches_transformers(name, shape):
    hf, ours = make_pair("Swinv2Model", **CONFIGS[name])
    x = torch.randn(shape[0], 3, shape[1], shape[2])
    with torch.no_grad():
        compare_outputs(ours(x, output_hidden_states=True), hf(x, output_hidden_states=True))
        theirs_tuple = hf(x, output_hidden_states=True, output_attentions=True, return_dict=False)
        ours_tuple = ours(x, output_hidden_states=True, output_attentions=True, return_dict=False)
    assert isinstance(ours_tuple, tuple) and len(ours_tuple) == len(theirs_tuple)
    for i, (a, b) in enumerate(zip(ours_tuple, theirs_tuple)):
        if isinstance(b, torch.Tensor):
            assert_close(a, b, name=f"tuple[{i}]")
        else:
            assert len(a) == len(b)
            for j, (u, v) in enumerate(zip(a, b)):
                assert_close(u, v, name=f"tuple[{i}][{j}]")


@pytest.mark.parametrize("name", ["w8", "w12-pretrained"])
def test_masked_image_modeling_matches_transformers(name):
    cfg = dict(CONFIGS[name], encoder_stride=2 ** (len(CONFIGS[name]["depths"]) + 1))
    hf, ours = make_pair("Swinv2ForMaskedImageModeling", **cfg)
    size = cfg["image_size"]
    x = torch.randn(2, 3, size, size)
    num_patches = (size // 4) ** 2
    bool_masked_pos = torch.rand(2, num_patches) < 0.6
    with torch.no_grad():
        expected = hf(x, bool_masked_pos=bool_masked_pos, output_hidden_states=True)
        actual = ours(x, bool_masked_pos=bool_masked_pos, output_hidden_states=True)
        compare_outputs(actual, expected)
        assert actual.loss.ndim == 0 and actual.loss > 0
        ours_tuple = ours(x, bool_masked_pos=bool_masked_pos, return_dict=False)
        theirs_tuple = hf(x, bool_masked_pos=bool_masked_pos, return_dict=False)
    assert len(ours_tuple) == len(theirs_tuple) == 2
    assert_close(ours_tuple[0], theirs_tuple[0], name="tuple loss")


@pytest.mark.parametrize("out_features", [None, ["stem", "stage2"], ["stage1", "stage2", "stage3"]])
def test_backbone_matches_transformers(out_features):
    hf, ours = make_pair("Swinv2Backbone", out_features=out_features, **CONFIGS["w8"])
    x = torch.randn(2, 3, 70, 50)
    with torch.no_grad():
        for kwargs in ({}, dict(output_hidden_states=True, output_attentions=True)):
            expected = hf(x, **kwargs)
            actual = ours(x, **kwargs)
            compare_outputs(actual, expected)
            assert all(f.dim() == 4 for f in actual.feature_maps)
            theirs_tuple = hf(x, return_dict=False, **kwargs)
            ours_tuple = ours(x, return_dict=False, **kwargs)
            assert len(ours_tuple) == len(theirs_tuple)
    assert ours.channels == hf.channels
    assert ours.out_features == hf.out_features


@pytest.mark.parametrize(
    "num_labels,make_labels,problem_type",
    [
        (1, lambda: torch.randn(3), "regression"),
        (4, lambda: torch.tensor([0, 3, 1]), "single_label_classification"),
        (4, lambda: torch.randint(0, 2, (3, 4)).float(), "multi_label_classification"),
    ],
    ids=["regression", "single-label", "multi-label"],
)
def test_classification_loss_matches_transformers(num_labels, make_labels, problem_type):
    labels = make_labels()  # drawn here, after the seed fixture, not at collection
    hf, ours = make_pair("Swinv2ForImageClassification", num_labels=num_labels, **CONFIGS["w8"])
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        expected = hf(x, labels=labels)
        actual = ours(x, labels=labels)
    assert ours.config.problem_type == hf.config.problem_type == problem_type
    assert_close(actual.loss, expected.loss, name="loss")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_error_is_that_of_transformers(dtype):
    """In bf16/fp16 our model's error against fp32 is of the size of transformers' own error in that dtype
    (at most twice it), the flash-attention rule for low-precision parity."""
    hf, ours = make_pair("Swinv2ForImageClassification", **CONFIGS["w8"])
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference = hf(x).logits.double()
        hf_low = hf.to(dtype)(x.to(dtype)).logits.double()
        ours_low = ours.to(dtype)(x.to(dtype)).logits.double()
    assert ours_low.dtype == torch.float64 and torch.isfinite(ours_low).all()
    hf_error = (hf_low - reference).abs().max().item()
    ours_error = (ours_low - reference).abs().max().item()
    assert ours_error <= 2 * hf_error + 1e-6, f"{dtype}: ours {ours_error:.3e} vs transformers {hf_error:.3e}"


@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
def test_cpu_bf16_autocast_error_is_that_of_transformers(train):
    """Under CPU autocast to bf16 (fp32 weights: oneDNN's bf16 linears in inference, the explicit attention
    chain in training; see swinv2_fast/linear.py and kernels/reference.py `sdpa_serves`), the logits and, for
    a training step, all parameter gradients against the fp32 model within LOW_PRECISION_FACTOR times
    transformers' own autocast error, plus the floor; errors relative to the largest element."""
    hf, ours = make_pair("Swinv2ForImageClassification", **CONFIGS["w8"])
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(11))

    def run(model, autocast):
        model.train(train)  # drop path and dropouts are 0: train mode changes only the autograd paths
        model.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(train), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(x).logits
        result = [logits.double()]
        if train:
            logits.float().square().mean().backward()
            result.append(torch.cat([p.grad.double().flatten() for p in model.parameters()]))
        return result

    reference = run(hf, autocast=False)
    hf_low, ours_low = run(hf, autocast=True), run(ours, autocast=True)
    for name, r, h, o in zip(["logits", "gradients"], reference, hf_low, ours_low):
        scale = r.abs().max().item()
        hf_error, ours_error = (h - r).abs().max().item() / scale, (o - r).abs().max().item() / scale
        assert ours_error <= LOW_PRECISION_FACTOR * hf_error + LOW_PRECISION_FLOOR, (name, ours_error, hf_error)


MODEL_CLASSES = ["Swinv2Model", "Swinv2ForImageClassification", "Swinv2ForMaskedImageModeling", "Swinv2Backbone"]


@pytest.mark.parametrize("cls_name", MODEL_CLASSES)
def test_meta_device_then_init_weights_equals_a_cpu_build(cls_name):
    """A model built under `with torch.device("meta")`, moved with to_empty() and initialised with
    init_weights() has the structure and the buffers (the CPB coordinates and index, not saved in
    checkpoints) of one built on the CPU, and runs to the same output with the same weights."""
    config = swinv2_fast.Swinv2Config(**CONFIGS["w8"], out_features=["stage1", "stage2"])
    reference = getattr(swinv2_fast, cls_name)(config).eval()
    with torch.device("meta"):
        model = getattr(swinv2_fast, cls_name)(
            swinv2_fast.Swinv2Config(**CONFIGS["w8"], out_features=["stage1", "stage2"])
        )
    assert all(b.device.type == "meta" for b in model.buffers())
    model.to_empty(device="cpu")
    model.init_weights()
    model.eval()
    assert [n for n, _ in model.named_modules()] == [n for n, _ in reference.named_modules()]
    buffers, expected = dict(model.named_buffers()), dict(reference.named_buffers())
    assert sorted(buffers) == sorted(expected) and any("relative_position_index" in n for n in buffers)
    for name, tensor in expected.items():
        assert torch.equal(buffers[name], tensor), name
    model.load_state_dict(reference.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert_close(
            model(x)[0] if cls_name != "Swinv2Backbone" else model(x).feature_maps[-1],
            reference(x)[0] if cls_name != "Swinv2Backbone" else reference(x).feature_maps[-1],
        )


def test_returned_attentions_receive_gradients():
    """The returned attentions are the tensors the output is computed from: retain_grad() on one gives a
    gradient, equal to transformers' on the same weights."""
    hf, ours = make_pair("Swinv2Model", **CONFIGS["w8"])
    x = torch.randn(1, 3, 64, 64)
    grads = []
    for model in (ours, hf):
        outputs = model(x, output_attentions=True)
        attentions = outputs.attentions[0]
        attentions.retain_grad()
        outputs.last_hidden_state.flatten()[0].backward()
        assert attentions.grad is not None and attentions.grad.abs().sum() > 0
        grads.append(attentions.grad)
    assert_close(grads[0], grads[1], name="gradient of attentions[0]")


def test_config_gradient_checkpointing_before_construction():
    """config.gradient_checkpointing = True set before construction enables checkpointing on every stage and
    is consumed (not saved), as transformers does."""
    config = swinv2_fast.Swinv2Config(**CONFIGS["w8"])
    config.gradient_checkpointing = True
    model = swinv2_fast.Swinv2ForImageClassification(config)
    assert model.is_gradient_checkpointing
    assert all(stage.gradient_checkpointing for stage in model.swinv2.encoder.layers)
    assert "gradient_checkpointing" not in model.config.to_dict()
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing


def test_backbone_has_transformers_backbone_attributes():
    config = swinv2_fast.Swinv2Config(**CONFIGS["w8"], out_features=["stage1", "stage3"])
    ours = swinv2_fast.Swinv2Backbone(config)
    theirs = transformers.Swinv2Backbone(transformers.Swinv2Config(**CONFIGS["w8"], out_features=["stage1", "stage3"]))
    for name in (
        "backbone_type",
        "stage_names",
        "num_features",
        "out_features",
        "out_indices",
        "out_feature_channels",
        "channels",
    ):
        assert getattr(ours, name) == getattr(theirs, name), name
    ours.out_indices = [-2, -1]
    assert ours.out_features == ["stage2", "stage3"] and ours.channels == ours.num_features[-2:]
