"""A drop-in for transformers users: every from_pretrained loading option on a directory written by
transformers' save_pretrained, the Trainer (gradient checkpointing, save_model, evaluation, prediction), the
Auto classes, and the behaviours transformers' own tests check on its Swinv2 classes
(tests/models/swinv2/test_modeling_swinv2.py and tests/test_modeling_common.py in transformers' repository),
ported here and run on swinv2_fast's classes. No hub: every directory is written here from random weights.
"""

import contextlib
import copy
import inspect
import json
import logging
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import swinv2_fast

from _utils import assert_close, perturb_

# A saved and reloaded model gives the same logits: within 1e-5 in fp32 between transformers and swinv2_fast
# (the drop-in bound; the two implementations sum in different orders), bit for bit within swinv2_fast.
RELOAD_FP32_ATOL = 1e-5

# transformers' Swinv2ModelTester (tests/models/swinv2/test_modeling_swinv2.py), batch 2 instead of 13
TESTER = dict(
    image_size=32,
    patch_size=2,
    num_channels=3,
    embed_dim=16,
    depths=[1, 2, 1],
    num_heads=[2, 2, 4],
    window_size=2,
    mlp_ratio=2.0,
    qkv_bias=True,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    drop_path_rate=0.1,
    hidden_act="gelu",
    use_absolute_embeddings=False,
    layer_norm_eps=1e-5,
    initializer_range=0.02,
    encoder_stride=8,
)
BATCH = 2
NUM_LABELS = 10  # the tester's type_sequence_label_size
ALL_MODEL_CLASSES = ("Swinv2Model", "Swinv2ForImageClassification", "Swinv2ForMaskedImageModeling")
# a small classifier for the loading and Trainer tests
SMALL = dict(
    image_size=32,
    patch_size=4,
    embed_dim=16,
    depths=[1, 1],
    num_heads=[1, 2],
    window_size=4,
    drop_path_rate=0.0,
    num_labels=3,
)


def make_tester_config(kind):
    """The tester's config as swinv2_fast's Swinv2Config or transformers' (our classes take both)."""
    cls = swinv2_fast.Swinv2Config if kind == "ours" else transformers.Swinv2Config
    return cls(**TESTER)


def pixel_values(batch=BATCH, channels=3, size=32, seed=0):
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def hf_directory(tmp_path):
    """A directory written by transformers' save_pretrained (fp32, random weights moved off their init)."""
    hf = perturb_(transformers.Swinv2ForImageClassification(transformers.Swinv2Config(**SMALL))).eval()
    directory = tmp_path / "hf"
    hf.save_pretrained(directory)
    return str(directory), hf


def float_tensors(model):
    return [(n, t) for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_floating_point()]


# ------------------------------------------------------------------------------------ loading options
@pytest.mark.parametrize("keyword", ["dtype", "torch_dtype"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, "bfloat16"], ids=["bf16", "fp16", "name"])
def test_dtype_loads_every_tensor_in_that_dtype(hf_directory, keyword, dtype):
    directory, hf = hf_directory
    expected = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model = swinv2_fast.Swinv2ForImageClassification.from_pretrained(directory, **{keyword: dtype})
    assert {n: t.dtype for n, t in float_tensors(model) if t.dtype != expected} == {}
    theirs = transformers.Swinv2ForImageClassification.from_pretrained(directory, **{keyword: dtype})
    assert model.dtype == theirs.dtype == expected
    for name, tensor in hf.state_dict().items():  # the checkpoint's values, rounded once
        assert torch.equal(model.state_dict()[name], tensor.to(expected)), name


def test_bf16_model_saves_and_reloads(hf_directory, tmp_path):
    directory, _ = hf_directory
    model = swinv2_fast.Swinv2ForImageClassification.from_pretrained(directory, torch_dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")  # a torch.dtype in the config must be written as its name
    saved = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert saved["dtype"] == "bfloat16" and "torch_dtype" not in saved
    for loader in (swinv2_fast.Swinv2ForImageClassification, transformers.Swinv2ForImageClassification):
        again = loader.from_pretrained(tmp_path / "bf16")  # "auto": the recorded dtype, as transformers 5
        assert again.dtype == torch.bfloat16, loader
        for name, tensor in model.state_dict().items():
            assert torch.equal(again.state_dict()[name], tensor), (loader, name)


def test_dtype_auto_reads_config_json(tmp_path):
    hf = transformers.Swinv2ForImageClassification(transformers.Swinv2Config(**SMALL)).half()
    hf.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "float16"
    for kwargs in ({}, {"dtype": "auto"}, {"torch_dtype": "auto"}):
        ours = swinv2_fast.Swinv2ForImageClassification.from_pretrained(tmp_path, **kwargs)
        theirs = transformers.Swinv2ForImageClassification.from_pretrained(tmp_path, **kwargs)
        assert ours.dtype == theirs.dtype == torch.float16, kwargs
        assert {t.dtype for _, t in float_tensors(ours)} == {torch.float16}
    ours = swinv2_fast.Swinv2ForImageClassification.from_pretrained(tmp_path, dtype=torch.float32)
    assert {t.dtype for _, t in float_tensors(ours)} == {torch.float32}


def test_bad_dtype_is_named(hf_directory):
    directory, _ = hf_directory
    with pytest.raises(ValueError, match=r"dtype must be a floating torch.dtype.* got torch.int64"):
        swinv2_fast.Swinv2ForImageClassification.from_pretrained(directory, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"dtype=torch\.float16 and torch_dtype=torch\.bfloat16 disagree"):
        swinv2_fast.Swinv2ForImageClassification.from_pretrained(
            directory, dtype=torch.float16, torch_dtype=torch.bfloat16
        )


def _device_maps():
    maps = ["cpu", torch.device("cpu"), {"": "cpu"}, "auto"]
    if torch.cuda.is_available():
        maps += ["cuda", 0, "cuda:0", {"": 0}]
    return maps


@pytest.mark.parametrize("device_map", _device_maps(), ids=str)
def test_device_map_puts_every_tensor_on_the_device(hf_directory, device_map):
    directory, _hf = hf_directory
    model = swinv2_fast.Swinv2ForImageClassification.from_pretrained(directory, device_map=device_map)
    if device_map == "auto":
        expected = (
            torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        )
    else:
        value = device_map[""] if isinstance(device_map, dict) else device_map
        expected = torch.device(f"cuda:{value}" if isinstance(value, int) else value)
        if expected.type == "cuda" and expected.index is None:
            expected = torch.device("cuda", torch.cuda.current_device())
    assert {str(t.device) for _, t in float_tensors(model)} == {str(expected)}
    assert model.hf_device_map == {"": str(expected)}
    # the same as loading on the CPU and moving the model (compared on that device: on a GPU, cuDNN's TF32
    # convolutions differ from the CPU's beyond RELOAD_FP32_ATOL)
    moved = swinv2_fast.Swinv2ForImageClassification.from_pretrained(directory).to(expected)
    x = pixel_values(size=32).to(expected)
    with torch.no_grad():
        assert_close(model(x).logits, moved(x).logits, atol=RELOAD_FP32_ATOL, name="logits")


def test_device_map_refusals_are_named(hf_directory):
    directory, _ = hf_directory
    with pytest.raises(ValueError, match="device_map over several devices"):
        swinv2_fast.Swinv2ForImageClassification.from_pretrained(
            directory, device_map={"swinv2.embeddings": "cpu", "swinv2.encoder": "meta"}
        )
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device_map='cuda' asks for a CUDA device"):
            swinv2_fast.Swinv2ForImageClassification.from_pretrained(directory, device_map="cuda")


@contextlib.contextmanager
def loading_report():
    """The records from_pretrained's loading report writes: to transformers' `transformers.modeling_utils`
    logger when the models are transformers models (which does not propagate to the root logger, so caplog
    does not see it), else to the package's logger."""
    name = "swinv2_fast" if swinv2_fast.modeling._TransformersPreTrainedModel is None else "transformers.modeling_utils"
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def report_text(records) -> str:
    return "\n".join(r.getMessage() for r in records)


def test_ignore_mismatched_sizes(hf_directory):
    """A shape mismatch raises RuntimeError (transformers' error) naming the weights and the way out;
    ignore_mismatched_sizes=True reinitialises them with a report, as transformers does."""
    directory, hf = hf_directory
    with pytest.raises(
        RuntimeError,
        match=r"shape mismatches: .*classifier.weight: checkpoint \(3, \d+\) vs model "
        r"\(7, \d+\).*ignore_mismatched_sizes=True",
    ):
        swinv2_fast.Swinv2ForImageClassification.from_pretrained(directory, num_labels=7)
    with pytest.raises(RuntimeError):
        transformers.Swinv2ForImageClassification.from_pretrained(directory, num_labels=7)
    with loading_report() as records:
        ours, info = swinv2_fast.Swinv2ForImageClassification.from_pretrained(
            directory, num_labels=7, ignore_mismatched_sizes=True, output_loading_info=True
        )
    assert "Reinit due to size mismatch" in report_text(records) and "classifier.weight" in report_text(records)
    theirs, their_info = transformers.Swinv2ForImageClassification.from_pretrained(
        directory, num_labels=7, ignore_mismatched_sizes=True, output_loading_info=True
    )
    assert info["mismatched_keys"] == their_info["mismatched_keys"]
    assert ours.classifier.weight.shape == theirs.classifier.weight.shape == (7, hf.classifier.in_features)
    for name, tensor in hf.state_dict().items():
        if not name.startswith("classifier."):
            assert torch.equal(ours.state_dict()[name], tensor), name


def test_missing_and_unexpected_keys_warn_and_load_what_is_there(hf_directory):
    """As in transformers: missing and unexpected keys are reported (not raised), the loading info lists them
    as sets, equal to transformers' own; strict=True raises ValueError listing them."""
    directory, hf = hf_directory
    weights = os.path.join(directory, "model.safetensors")
    state = load_file(weights)
    dropped = "swinv2.encoder.layers.0.blocks.0.attention.output.dense.weight"
    del state[dropped]
    state["swinv2.stray.weight"] = torch.zeros(2)
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(
        ValueError,
        match=r"missing keys: \['" + dropped.replace(".", r"\.") + r"'\]; unexpected keys: \['swinv2\.stray\.weight'\]",
    ):
        swinv2_fast.Swinv2ForImageClassification.from_pretrained(directory, strict=True)
    with loading_report() as records:
        model, info = swinv2_fast.Swinv2ForImageClassification.from_pretrained(directory, output_loading_info=True)
    assert dropped in report_text(records) and "stray" in report_text(records)
    assert info["missing_keys"] == {dropped} and info["unexpected_keys"] == {"swinv2.stray.weight"}
    _, their_info = transformers.Swinv2ForImageClassification.from_pretrained(directory, output_loading_info=True)
    assert their_info["missing_keys"] == info["missing_keys"]
    assert their_info["unexpected_keys"] == info["unexpected_keys"]
    for name, tensor in hf.state_dict().items():
        if name != dropped:
            assert torch.equal(model.state_dict()[name], tensor), name


def test_from_pretrained_without_a_directory(hf_directory):
    """from_pretrained(None, config=, state_dict=) builds the model from the given weights (transformers'
    form); without both it names what is missing."""
    directory, hf = hf_directory
    config = swinv2_fast.Swinv2Config.from_pretrained(directory)
    model = swinv2_fast.Swinv2ForImageClassification.from_pretrained(None, config=config, state_dict=hf.state_dict())
    for name, tensor in hf.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    with pytest.raises(ValueError, match=r"needs both config= and state_dict= \(got config=given, state_dict=None\)"):
        swinv2_fast.Swinv2ForImageClassification.from_pretrained(None, config=config)


def test_from_pretrained_refuses_the_meta_device_context(hf_directory):
    directory, _ = hf_directory
    with torch.device("meta"):
        with pytest.raises(RuntimeError, match="with a meta device context manager"):
            transformers.Swinv2ForImageClassification.from_pretrained(directory)
        with pytest.raises(RuntimeError, match="with a meta device context manager"):
            swinv2_fast.Swinv2ForImageClassification.from_pretrained(directory)


HUB_OPTIONS = dict(
    revision="main",
    low_cpu_mem_usage=True,
    local_files_only=True,
    trust_remote_code=False,
    force_download=False,
    token=None,
    proxies=None,
)


def test_hub_options_are_accepted_and_never_saved(hf_directory, tmp_path):
    directory, _hf = hf_directory
    model = swinv2_fast.Swinv2ForImageClassification.from_pretrained(
        directory, cache_dir=str(tmp_path / "cache"), **HUB_OPTIONS
    )
    plain = swinv2_fast.Swinv2ForImageClassification.from_pretrained(directory)
    model.save_pretrained(tmp_path / "with")
    plain.save_pretrained(tmp_path / "without")
    with_options = json.loads((tmp_path / "with" / "config.json").read_text())
    assert with_options == json.loads((tmp_path / "without" / "config.json").read_text())
    assert not set(with_options) & (set(HUB_OPTIONS) | {"cache_dir"})
    x = pixel_values()
    with torch.no_grad():
        assert torch.equal(model(x).logits, plain(x).logits)


def test_unknown_and_unsupported_keywords_are_refused(hf_directory):
    directory, _ = hf_directory
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['num_lables'\]"):
        swinv2_fast.Swinv2ForImageClassification.from_pretrained(directory, num_lables=4)
    with pytest.raises(
        NotImplementedError, match=r"from_pretrained\(quantization_config=\.\.\.\): quantized loading is not supported"
    ):
        swinv2_fast.Swinv2ForImageClassification.from_pretrained(directory, quantization_config={"bits": 4})


def test_hub_id_outside_the_cache_is_a_clear_error(tmp_path):
    with pytest.raises(
        FileNotFoundError,
        match=r"'microsoft/swinv2-tiny-patch4-window8-256' is not a directory\. "
        r"swinv2_fast loads local directories only \(a directory written by "
        r"save_pretrained: config\.json beside model\.safetensors",
    ):
        swinv2_fast.Swinv2ForImageClassification.from_pretrained(
            "microsoft/swinv2-tiny-patch4-window8-256", cache_dir=str(tmp_path)
        )
    with pytest.raises(
        FileNotFoundError,
        match=r"'no/such/directory' is not a directory.* huggingface_hub's local cache: "
        r"'no/such/directory' is not a hub id either",
    ):
        swinv2_fast.Swinv2ForImageClassification.from_pretrained("no/such/directory")


def test_hub_id_in_the_local_cache_loads(hf_directory, tmp_path):
    """A snapshot in huggingface_hub's cache layout (what a download leaves) is found without the network."""
    pytest.importorskip("huggingface_hub")
    directory, hf = hf_directory
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--someone--tiny-swinv2"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in os.listdir(directory):
        (snapshot / name).write_bytes(pathlib.Path(directory, name).read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    model = swinv2_fast.Swinv2ForImageClassification.from_pretrained(
        "someone/tiny-swinv2", cache_dir=str(tmp_path / "cache")
    )
    for name, tensor in hf.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    with pytest.raises(FileNotFoundError, match="at revision 'v2'"):
        swinv2_fast.Swinv2ForImageClassification.from_pretrained(
            "someone/tiny-swinv2", revision="v2", cache_dir=str(tmp_path / "cache")
        )


def test_subfolder_variant_sharding_and_bin(hf_directory, tmp_path):
    directory, hf = hf_directory
    model = swinv2_fast.Swinv2ForImageClassification.from_pretrained(directory)
    model.save_pretrained(tmp_path / "repo" / "sub", variant="v1", max_shard_size="20KB")
    files = sorted(os.listdir(tmp_path / "repo" / "sub"))
    assert "model.safetensors.index.v1.json" in files and any(f.startswith("model.v1-00001-of-") for f in files)
    for loader in (swinv2_fast.Swinv2ForImageClassification, transformers.Swinv2ForImageClassification):
        again = loader.from_pretrained(tmp_path / "repo", subfolder="sub", variant="v1")
        for name, tensor in hf.state_dict().items():
            assert torch.equal(again.state_dict()[name], tensor), (loader, name)
    model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert "pytorch_model.bin" in os.listdir(tmp_path / "bin")
    with pytest.raises(FileNotFoundError, match=r"use_safetensors=True"):
        swinv2_fast.Swinv2ForImageClassification.from_pretrained(tmp_path / "bin", use_safetensors=True)
    again = transformers.Swinv2ForImageClassification.from_pretrained(tmp_path / "bin")
    assert torch.equal(again.classifier.weight, hf.classifier.weight)


def test_transformers_config_accepted_directly(hf_directory):
    directory, hf = hf_directory
    model = swinv2_fast.Swinv2ForImageClassification(hf.config)
    assert isinstance(model.config, swinv2_fast.Swinv2Config) and model.config.num_labels == SMALL["num_labels"]
    assert list(model.state_dict()) == list(hf.state_dict())
    loaded = swinv2_fast.Swinv2ForImageClassification.from_pretrained(directory, config=hf.config)
    assert torch.equal(loaded.classifier.weight, hf.classifier.weight)
    with pytest.raises(
        TypeError,
        match=r"config must be a swinv2_fast\.Swinv2Config or a transformers Swinv2Config "
        r"\(converted with swinv2_fast\.Swinv2Config\.from_transformers\), got "
        r"ViTConfig with model_type 'vit'",
    ):
        swinv2_fast.Swinv2Model(transformers.ViTConfig())


# ----------------------------------------------------------------------------------------- Trainer
class _ImageDataset(torch.utils.data.Dataset):
    def __init__(self, n, size, num_labels, seed):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, size, size, generator=g)
        self.labels = torch.randint(0, num_labels, (n,), generator=g)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"pixel_values": self.images[i], "labels": self.labels[i]}


def _accuracy(eval_prediction):
    predictions, labels = eval_prediction.predictions, eval_prediction.label_ids
    logits = predictions[0] if isinstance(predictions, tuple) else predictions
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


@pytest.mark.parametrize(
    "gc_kwargs",
    [None, {"use_reentrant": True, "every_n_layers": 2, "offload": True}],
    ids=["default", "reentrant-every2-offload"],
)
def test_trainer_checkpointed_training_save_model_and_reload(tmp_path, monkeypatch, gc_kwargs):
    model = swinv2_fast.Swinv2ForImageClassification(swinv2_fast.Swinv2Config(**SMALL))
    perturb_(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    checkpointed = []
    original = torch.utils.checkpoint.checkpoint

    def spy(function, *args, **kwargs):
        checkpointed.append(kwargs)
        return original(function, *args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", spy)
    offloads = []
    save_on_cpu = torch.autograd.graph.save_on_cpu

    def offload_spy(*args, **kwargs):
        offloads.append(kwargs)
        return save_on_cpu(*args, **kwargs)

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", offload_spy)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=2,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        learning_rate=1e-3,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs=gc_kwargs,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        label_names=["labels"],
        seed=0,
    )
    train, evaluation = _ImageDataset(8, 32, 3, seed=1), _ImageDataset(6, 32, 3, seed=2)
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=train, eval_dataset=evaluation, compute_metrics=_accuracy
    )
    trainer.train()
    assert model.is_gradient_checkpointing
    # two stages, every_n_layers=2 checkpoints stage 0 only; each checkpointed forward once per step
    per_step = 1 if gc_kwargs and gc_kwargs.get("every_n_layers") == 2 else 2
    assert len(checkpointed) == 2 * per_step
    expected_kwargs = {"use_reentrant": True} if gc_kwargs else {"use_reentrant": False}
    assert all(k == expected_kwargs for k in checkpointed), checkpointed
    assert len(offloads) == (len(checkpointed) if gc_kwargs else 0)  # offload: each checkpointed stage
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters()), "no training happened"

    metrics = trainer.evaluate()
    prediction = trainer.predict(evaluation)
    model.eval()
    with torch.no_grad():  # on the Trainer's device, as its predictions
        logits = model(evaluation.images.to(model.device)).logits.cpu()
    assert_close(torch.as_tensor(prediction.predictions), logits, atol=RELOAD_FP32_ATOL, name="predictions")
    assert torch.equal(torch.as_tensor(prediction.label_ids), evaluation.labels)
    accuracy = float((logits.argmax(-1) == evaluation.labels).float().mean())
    assert metrics["eval_accuracy"] == pytest.approx(accuracy) == prediction.metrics["test_accuracy"]
    loss = torch.nn.functional.cross_entropy(logits, evaluation.labels)
    assert metrics["eval_loss"] == pytest.approx(float(loss), abs=1e-5)

    trainer.save_model(str(tmp_path / "final"))
    assert {"config.json", "model.safetensors"} <= set(os.listdir(tmp_path / "final"))
    x = evaluation.images
    with torch.no_grad():
        logits = model.cpu()(x).logits  # the reloads run on the CPU
        ours = swinv2_fast.Swinv2ForImageClassification.from_pretrained(tmp_path / "final")
        theirs = transformers.Swinv2ForImageClassification.from_pretrained(tmp_path / "final").eval()
        assert torch.equal(ours(x).logits, logits), "swinv2_fast reload differs"
        assert_close(theirs(x).logits, logits, atol=RELOAD_FP32_ATOL, name="transformers reload")


def test_gradient_checkpointing_enable_accepts_transformers_arguments():
    model = swinv2_fast.Swinv2ForImageClassification(swinv2_fast.Swinv2Config(**SMALL))
    model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False}, every_n_layers=1, offload=False
    )
    assert model.is_gradient_checkpointing
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing
    with pytest.raises(ValueError, match="every_n_layers must be an int >= 1, got 0"):
        model.gradient_checkpointing_enable(every_n_layers=0)


# ---------------------------------------------------------------------------------------- AutoClass
def test_importing_registers_nothing():
    code = (
        "import swinv2_fast, transformers\n"
        "from transformers.models.auto.configuration_auto import CONFIG_MAPPING\n"
        "assert 'swinv2_fast' not in CONFIG_MAPPING, 'registered on import'\n"
        "swinv2_fast.register_auto_classes()\n"
        "assert CONFIG_MAPPING['swinv2_fast'] is swinv2_fast.Swinv2FastConfig\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=600)


def test_auto_classes_return_ours_for_as_swinv2_fast(tmp_path):
    swinv2_fast.register_auto_classes()
    swinv2_fast.register_auto_classes()  # twice is harmless
    model = perturb_(swinv2_fast.Swinv2ForImageClassification(swinv2_fast.Swinv2Config(**SMALL))).eval()
    model.save_pretrained(tmp_path / "fast", as_swinv2_fast=True)
    model.save_pretrained(tmp_path / "default")
    assert json.loads((tmp_path / "fast" / "config.json").read_text())["model_type"] == "swinv2_fast"
    assert json.loads((tmp_path / "default" / "config.json").read_text())["model_type"] == "swinv2"
    assert isinstance(transformers.AutoConfig.from_pretrained(tmp_path / "fast"), swinv2_fast.Swinv2FastConfig)
    x = pixel_values()
    with torch.no_grad():
        expected = model(x).logits
        auto = transformers.AutoModelForImageClassification.from_pretrained(tmp_path / "fast")
        assert type(auto) is swinv2_fast.Swinv2ForImageClassification
        assert torch.equal(auto(x).logits, expected)
        default = transformers.AutoModelForImageClassification.from_pretrained(tmp_path / "default").eval()
        assert type(default) is transformers.Swinv2ForImageClassification
        assert_close(default(x).logits, expected, atol=RELOAD_FP32_ATOL, name="transformers' class")
    for auto_class, ours in (
        (transformers.AutoModel, swinv2_fast.Swinv2Model),
        (transformers.AutoModelForMaskedImageModeling, swinv2_fast.Swinv2ForMaskedImageModeling),
    ):
        assert type(auto_class.from_pretrained(tmp_path / "fast")) is ours, auto_class
    # (transformers' AutoBackbone.from_pretrained asks the hub whether the name is a repo, even for a local
    # directory: without network only from_config can be checked here)
    config = swinv2_fast.Swinv2FastConfig(**TESTER)
    for auto_class, ours in (
        (transformers.AutoModel, swinv2_fast.Swinv2Model),
        (transformers.AutoBackbone, swinv2_fast.Swinv2Backbone),
    ):
        assert type(auto_class.from_config(config)) is ours, auto_class


def test_trainer_saves_the_model_type_it_was_given(tmp_path):
    """save_model writes model_type "swinv2" by default: transformers' Auto classes load their own class."""
    model = swinv2_fast.Swinv2ForImageClassification(swinv2_fast.Swinv2Config(**SMALL))
    trainer = transformers.Trainer(
        model=model, args=transformers.TrainingArguments(output_dir=str(tmp_path), report_to="none", disable_tqdm=True)
    )
    trainer.save_model(str(tmp_path / "saved"))
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["model_type"] == "swinv2" and config["architectures"] == ["Swinv2ForImageClassification"]


def test_package_runs_without_transformers(tmp_path):
    """transformers made unimportable: swinv2_fast imports, builds, runs, saves and reloads; the base class is
    nn.Module and register_auto_classes says why it cannot work."""
    code = f"""
import sys
sys.modules["transformers"] = None  # import transformers -> ImportError
import torch, swinv2_fast
# Swinv2Model -> Swinv2PreTrainedModel -> PreTrainedMixin -> the base: nn.Module
assert swinv2_fast.Swinv2Model.__mro__[3] is torch.nn.Module, swinv2_fast.Swinv2Model.__mro__
config = swinv2_fast.Swinv2Config(**{SMALL!r})
model = swinv2_fast.Swinv2ForImageClassification(config).eval()
x = torch.randn(1, 3, 32, 32)
model.save_pretrained({str(tmp_path / "m")!r})
again = swinv2_fast.Swinv2ForImageClassification.from_pretrained({str(tmp_path / "m")!r})
with torch.no_grad():
    assert torch.equal(again(x).logits, model(x).logits)
in_bf16 = swinv2_fast.Swinv2ForImageClassification.from_pretrained({str(tmp_path / "m")!r}, dtype="bfloat16")
assert in_bf16.dtype == torch.bfloat16
assert swinv2_fast.Swinv2Config.__mro__[1:] == (object,), swinv2_fast.Swinv2Config.__mro__
# gradient checkpointing through the stand-in checkpointing layer: each stage recomputed in the backward
model.train()
model.gradient_checkpointing_enable()
calls = []
model.swinv2.encoder.layers[0].register_forward_pre_hook(lambda *args: calls.append(1))
model(x, labels=torch.tensor([1])).loss.backward()
assert model.is_gradient_checkpointing and len(calls) == 2, calls
try:
    swinv2_fast.register_auto_classes()
except ImportError as error:
    assert "needs transformers" in str(error)
else:
    raise AssertionError("register_auto_classes without transformers did not raise")
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=600)


# ------------------------------------------------- ported: transformers' Swinv2ModelTest and common tester
def _config_zero_init(config):
    """transformers' _config_zero_init: every *_range / *_std / initializer_factor / layer_scale field 1e-10."""
    config = copy.deepcopy(config)
    for key in list(vars(config)):
        if "_range" in key or "_std" in key or "initializer_factor" in key or "layer_scale" in key:
            setattr(config, key, 1e-10)
    return config


def test_config_like_transformers_config_tester(tmp_path):
    """ConfigTester(config_class=Swinv2Config, embed_dim=37): json round trips, num_labels, defaults, common
    kwargs. embed_dim=37 does not divide by the default heads: a config accepts it, as transformers' does."""
    config = swinv2_fast.Swinv2Config(embed_dim=37)
    assert transformers.Swinv2Config(embed_dim=37).embed_dim == config.embed_dim == 37
    with pytest.raises(ValueError, match=r"stage 0 has 37 channels \(embed_dim=37\) and num_heads\[0\]=3"):
        swinv2_fast.Swinv2Model(config)
    for name in ("hidden_size", "num_attention_heads", "num_hidden_layers"):
        assert hasattr(config, name), name
    data = json.loads(config.to_json_string())
    assert data["embed_dim"] == 37
    config.save_pretrained(tmp_path)
    assert swinv2_fast.Swinv2Config.from_pretrained(tmp_path) == config
    assert transformers.Swinv2Config.from_pretrained(tmp_path).embed_dim == 37
    assert len(swinv2_fast.Swinv2Config(num_labels=5).id2label) == 5
    config.num_labels = 3
    assert len(config.id2label) == len(config.label2id) == 3
    # a part of transformers' config_common_kwargs: the fields the models read, and others kept verbatim
    common = dict(
        return_dict=False,
        output_hidden_states=True,
        output_attentions=True,
        problem_type="regression",
        id2label={0: "a", 1: "b"},
        label2id={"a": 0, "b": 1},
        torchscript=True,
        finetuning_task="NER",
        architectures=["BertModel"],
        tokenizer_class="BertTokenizerFast",
        chunk_size_feed_forward=5,
    )
    config = swinv2_fast.Swinv2Config(**common)
    assert {k: getattr(config, k) for k in common} == common
    config.save_pretrained(tmp_path / "common")
    again = swinv2_fast.Swinv2Config.from_pretrained(tmp_path / "common")
    assert {k: getattr(again, k) for k in common} == common
    ours = swinv2_fast.Swinv2Config()
    theirs = transformers.Swinv2Config()
    for key in (
        "image_size",
        "patch_size",
        "embed_dim",
        "depths",
        "num_heads",
        "window_size",
        "mlp_ratio",
        "drop_path_rate",
        "hidden_size",
        "num_layers",
        "encoder_stride",
        "initializer_range",
    ):
        a, b = getattr(ours, key), getattr(theirs, key)
        assert (list(a) if isinstance(a, (list, tuple)) else a) == (list(b) if isinstance(b, (list, tuple)) else b), key


@pytest.mark.parametrize("kind", ["ours", "transformers"])
def test_model_and_heads_shapes(kind):
    """create_and_check_model, _for_masked_image_modeling (also greyscale), _for_image_classification."""
    config = make_tester_config(kind)
    x = pixel_values()
    model = swinv2_fast.Swinv2Model(config).eval()
    seq_len = ((config.image_size // config.patch_size) ** 2) // (4 ** (len(config.depths) - 1))
    dim = int(config.embed_dim * 2 ** (len(config.depths) - 1))
    assert model(x).last_hidden_state.shape == (BATCH, seq_len, dim)
    mim = swinv2_fast.Swinv2ForMaskedImageModeling(config).eval()
    assert mim(x).reconstruction.shape == (BATCH, 3, 32, 32)
    grey = copy.deepcopy(config)
    grey.num_channels = 1
    mim = swinv2_fast.Swinv2ForMaskedImageModeling(grey).eval()
    assert mim(pixel_values(channels=1)).reconstruction.shape == (BATCH, 1, 32, 32)
    config.num_labels = NUM_LABELS
    classifier = swinv2_fast.Swinv2ForImageClassification(config).eval()
    output = classifier(x, labels=torch.arange(BATCH) % NUM_LABELS)
    assert output.logits.shape == (BATCH, NUM_LABELS) and torch.isfinite(output.loss)


@pytest.mark.parametrize("cls_name", ALL_MODEL_CLASSES)
def test_common_attributes_and_forward_signature(cls_name):
    """test_model_common_attributes, test_forward_signature, test_model_main_input_name, dummy inputs."""
    model = getattr(swinv2_fast, cls_name)(make_tester_config("ours")).eval()
    assert isinstance(model.get_input_embeddings(), torch.nn.Module)
    output_embeddings = model.get_output_embeddings()
    assert output_embeddings is None or isinstance(output_embeddings, torch.nn.Linear)
    arg_names = list(inspect.signature(model.forward).parameters)
    assert arg_names[:1] == ["pixel_values"] == [model.main_input_name]
    assert isinstance(model, transformers.PreTrainedModel)
    assert model.base_model is getattr(model, "swinv2", model)
    assert not model.can_generate()
    assert model.get_memory_footprint() >= 4 * model.num_parameters() > 0
    model.tie_weights()  # nothing is tied; transformers' loaders call it
    model(**model.dummy_inputs)


@pytest.mark.parametrize("cls_name", ALL_MODEL_CLASSES)
def test_attention_outputs(cls_name):
    """test_attention_outputs: by argument and by config; attentions come last, after the hidden states."""
    config = make_tester_config("ours")
    cls = getattr(swinv2_fast, cls_name)
    x = pixel_values()
    expected_shape = [TESTER["num_heads"][0], TESTER["window_size"] ** 2, TESTER["window_size"] ** 2]
    with torch.no_grad():
        outputs = cls(config).eval()(x, output_attentions=True, output_hidden_states=False)
        assert len(outputs.attentions) == len(TESTER["depths"])
        config.output_attentions = True
        model = cls(config).eval()
        outputs = model(x)
        assert len(outputs.attentions) == len(TESTER["depths"])
        assert list(outputs.attentions[0].shape[-3:]) == expected_shape
        out_len = len(outputs)
        outputs = model(x, output_attentions=True, output_hidden_states=True)
        assert len(outputs) == out_len + 2  # hidden_states and reshaped_hidden_states
        assert list(outputs.attentions[0].shape[-3:]) == expected_shape
        assert list(outputs.keys())[-2:] == ["attentions", "reshaped_hidden_states"]


def _check_hidden_states(cls, config, kwargs, image_size):
    with torch.no_grad():
        outputs = cls(config).eval()(pixel_values(), **kwargs)
    num_patches = (image_size[1] // config.patch_size) * (image_size[0] // config.patch_size)
    assert len(outputs.hidden_states) == len(config.depths) + 1
    assert list(outputs.hidden_states[0].shape[-2:]) == [num_patches, config.embed_dim]
    assert len(outputs.reshaped_hidden_states) == len(config.depths) + 1
    _b, c, h, w = outputs.reshaped_hidden_states[0].shape
    assert [h * w, c] == [num_patches, config.embed_dim]


@pytest.mark.parametrize("cls_name", ALL_MODEL_CLASSES)
@pytest.mark.parametrize("patch_size", [2, 3], ids=["divisible", "padded"])
def test_hidden_states_output(cls_name, patch_size):
    """test_hidden_states_output and _with_padding: by argument, then by config."""
    config = make_tester_config("ours")
    config.patch_size = patch_size
    size = 32 if 32 % patch_size == 0 else 32 + patch_size - 32 % patch_size
    cls = getattr(swinv2_fast, cls_name)
    _check_hidden_states(cls, config, {"output_hidden_states": True}, (size, size))
    config.output_hidden_states = True
    _check_hidden_states(cls, config, {}, (size, size))


@pytest.mark.parametrize("kind", ["ours", "transformers"])
def test_initialization_with_zero_range(kind):
    """test_initialization: with every init range at 1e-10, each parameter's mean is 0 or 1 (embeddings and
    the logit scale excepted), as transformers' Swinv2 initialises."""
    config = _config_zero_init(make_tester_config(kind))
    for cls_name in ALL_MODEL_CLASSES:
        model = getattr(swinv2_fast, cls_name)(config)
        for name, param in model.named_parameters():
            if "embeddings" not in name and "logit_scale" not in name and param.requires_grad:
                mean = ((param.data.mean() * 1e9).round() / 1e9).item()
                assert mean in (0.0, 1.0), f"{cls_name}.{name}: mean {mean}"


def test_initialization_matches_transformers_statistics():
    """Same init scheme as transformers: the same parameters are zero, one or log(10)."""
    config = transformers.Swinv2Config(**TESTER)
    ours = swinv2_fast.Swinv2ForMaskedImageModeling(config).state_dict()
    theirs = transformers.Swinv2ForMaskedImageModeling(config).state_dict()
    assert list(ours) == list(theirs)
    for name, tensor in theirs.items():
        for value in (0.0, 1.0, float(torch.log(torch.tensor(10.0)))):
            assert bool((tensor == value).all()) == bool((ours[name] == value).all()), name


@pytest.mark.parametrize("cls_name", ALL_MODEL_CLASSES)
def test_save_load_determinism_and_tuple_outputs(cls_name, tmp_path):
    """test_save_load, test_determinism, test_model_outputs_equivalence, test_torch_save_load."""
    cls = getattr(swinv2_fast, cls_name)
    model = perturb_(cls(make_tester_config("ours"))).eval()
    x = pixel_values()
    with torch.no_grad():
        first = model(x, output_hidden_states=True)
        assert torch.equal(model(x, output_hidden_states=True)[0], first[0])
        as_tuple = model(x, output_hidden_states=True, return_dict=False)
        assert len(as_tuple) == len(first.to_tuple())
        for a, b in zip(as_tuple, first.to_tuple()):
            if isinstance(a, torch.Tensor):
                assert torch.equal(a, b)
            else:
                assert all(torch.equal(p, q) for p, q in zip(a, b))
        model.save_pretrained(tmp_path / "m")
        again = cls.from_pretrained(tmp_path / "m")
        assert torch.equal(again(x, output_hidden_states=True)[0], first[0])
        torch.save(model.state_dict(), tmp_path / "sd.pt")
        fresh = cls(make_tester_config("ours")).eval()
        fresh.load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=True))
        assert torch.equal(fresh(x)[0], first[0])


@pytest.mark.parametrize(
    "problem_type,labels",
    [
        ("regression", lambda: torch.randn(BATCH, NUM_LABELS)),
        ("single_label_classification", lambda: torch.arange(BATCH) % NUM_LABELS),
        ("multi_label_classification", lambda: (torch.rand(BATCH, NUM_LABELS) > 0.5).float()),
    ],
)
def test_problem_types_match_transformers(problem_type, labels):
    """test_problem_types: each problem type's loss, equal to transformers' on the same weights."""
    config = transformers.Swinv2Config(
        **dict(TESTER, drop_path_rate=0.0), num_labels=NUM_LABELS, problem_type=problem_type
    )
    theirs = perturb_(transformers.Swinv2ForImageClassification(config)).eval()
    ours = swinv2_fast.Swinv2ForImageClassification(config).eval()
    ours.load_state_dict(theirs.state_dict())
    x, y = pixel_values(), labels()
    assert_close(ours(x, labels=y).loss, theirs(x, labels=y).loss, atol=RELOAD_FP32_ATOL, name="loss")


@pytest.mark.parametrize("cls_name", ["Swinv2ForImageClassification", "Swinv2ForMaskedImageModeling"])
def test_training_and_gradient_checkpointing(cls_name):
    """test_training, test_training_gradient_checkpointing, test_gradient_checkpointing_enable_disable:
    checkpointed gradients equal plain ones and reach every parameter that requires one."""
    config = dict(TESTER, drop_path_rate=0.0)
    model = perturb_(getattr(swinv2_fast, cls_name)(swinv2_fast.Swinv2Config(**config, num_labels=NUM_LABELS)))
    model.train()
    x = pixel_values()
    inputs = (
        {"labels": torch.arange(BATCH) % NUM_LABELS}
        if cls_name.endswith("Classification")
        else {"bool_masked_pos": torch.rand(BATCH, 256, generator=torch.Generator().manual_seed(3)) > 0.5}
    )
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        if checkpointing:
            assert not model.is_gradient_checkpointing
            model.gradient_checkpointing_enable()
            assert model.is_gradient_checkpointing
        model(x, **inputs).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(grads[1]) == set(grads[0]) == trainable
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


def test_retain_grad_hidden_states_attentions():
    """test_retain_grad_hidden_states_attentions."""
    model = swinv2_fast.Swinv2Model(make_tester_config("ours"))
    model.train()
    outputs = model(pixel_values(), output_hidden_states=True, output_attentions=True)
    hidden, attentions = outputs.hidden_states[0], outputs.attentions[0]
    hidden.retain_grad()
    attentions.retain_grad()
    (outputs.last_hidden_state.sum() + attentions.sum()).backward()
    assert hidden.grad is not None and attentions.grad is not None


# ------------------------------------------------------------------------------------ docs and messages
PUBLIC_MODELS = ("Swinv2Model", "Swinv2ForImageClassification", "Swinv2ForMaskedImageModeling", "Swinv2Backbone")


@pytest.mark.parametrize("cls_name", PUBLIC_MODELS + ("Swinv2PreTrainedModel", "Swinv2Config"))
def test_public_classes_are_documented(cls_name):
    cls = getattr(swinv2_fast, cls_name)
    assert cls.__doc__ and len(cls.__doc__.split()) > 10, cls_name
    if cls_name in PUBLIC_MODELS:
        doc = cls.forward.__doc__ or ""
        for word in ("pixel_values", "Returns", "output_attentions", "return_dict"):
            assert word in doc, f"{cls_name}.forward docstring lacks {word}"
    for method in ("from_pretrained", "save_pretrained"):
        assert getattr(cls, method).__doc__, f"{cls_name}.{method}"


def test_warnings_name_the_package_when_logging_is_unconfigured(tmp_path):
    """Without logging configured, a warning reads 'swinv2_fast WARNING: ...' (Python's last-resort handler
    would print the bare message), and goes above an active tqdm bar instead of into it."""
    code = f"""
import swinv2_fast, tqdm
config = swinv2_fast.Swinv2Config(**{SMALL!r}, window_semantics="timm")
model = swinv2_fast.Swinv2ForImageClassification(config)
bar = tqdm.tqdm(total=2, desc="job", file=__import__("sys").stderr)
bar.update(1)
model.save_pretrained({str(tmp_path / "m")!r})
bar.close()
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=True)
    lines = [line for line in result.stderr.replace("\r", "\n").splitlines() if "window_semantics" in line]
    assert lines and all(
        line.startswith("swinv2_fast WARNING: saving a model with window_semantics='timm'") for line in lines
    ), result.stderr


def test_push_to_hub_uploads_a_directory_transformers_reads(tmp_path, monkeypatch):
    """push_to_hub (transformers' PushToHubMixin) with its network calls replaced: the uploaded folder is
    what save_pretrained writes, and transformers loads it."""
    import types

    import transformers.utils.hub as hub

    monkeypatch.setattr(
        hub,
        "hf_api",
        lambda: types.SimpleNamespace(create_repo=lambda repo_id, **kwargs: types.SimpleNamespace(repo_id=repo_id)),
    )
    monkeypatch.setattr(
        hub,
        "create_and_tag_model_card",
        lambda *args, **kwargs: types.SimpleNamespace(save=lambda path: open(path, "w").close()),
    )
    model = perturb_(swinv2_fast.Swinv2ForImageClassification(swinv2_fast.Swinv2Config(**SMALL))).eval()
    uploaded = {}

    def upload(working_dir, repo_id, **kwargs):
        import shutil

        shutil.copytree(working_dir, tmp_path / "uploaded")
        uploaded["repo_id"] = repo_id

    monkeypatch.setattr(model, "_upload_modified_files", upload, raising=False)
    model.push_to_hub("someone/tiny-swinv2")
    assert uploaded["repo_id"] == "someone/tiny-swinv2"
    theirs = transformers.Swinv2ForImageClassification.from_pretrained(tmp_path / "uploaded")
    assert torch.equal(theirs.classifier.weight, model.classifier.weight)


def test_image_classification_pipeline():
    """transformers' pipeline takes the model as it takes its own: scores are the softmax of the logits."""
    pytest.importorskip("PIL")
    import numpy as np
    from PIL import Image

    model = perturb_(swinv2_fast.Swinv2ForImageClassification(swinv2_fast.Swinv2Config(**SMALL))).eval()
    processor = transformers.ViTImageProcessor(size={"height": 32, "width": 32})
    classify = transformers.pipeline("image-classification", model=model, image_processor=processor, device="cpu")
    image = Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype("uint8"))
    result = classify(image, top_k=SMALL["num_labels"])
    with torch.no_grad():
        probabilities = model(processor(image, return_tensors="pt").pixel_values).logits.softmax(-1)[0]
    for entry in result:
        index = model.config.label2id[entry["label"]]
        assert entry["score"] == pytest.approx(float(probabilities[index]), abs=1e-6)
