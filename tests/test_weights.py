"""Checkpoint directories: transformers -> swinv2_fast, swinv2_fast -> transformers, key layouts, errors."""

import json
import logging

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import swinv2_fast

from _utils import CONFIGS, assert_close, make_pair

CLASSES = ["Swinv2Model", "Swinv2ForImageClassification", "Swinv2ForMaskedImageModeling", "Swinv2Backbone"]


def outputs_of(model, x):
    with torch.no_grad():
        out = model(x)
    for key in ("logits", "reconstruction", "last_hidden_state"):
        if key in out:
            return [out[key]]
    return list(out.feature_maps)


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
@pytest.mark.parametrize("cls_name", CLASSES)
@pytest.mark.parametrize("name", ["w8", "w12-pretrained"])
def test_from_pretrained_reads_transformers_directories(tmp_path, cls_name, name, safe):
    cfg = dict(CONFIGS[name])
    if cls_name == "Swinv2ForMaskedImageModeling":
        cfg["encoder_stride"] = 2 ** (len(cfg["depths"]) + 1)
    if cls_name == "Swinv2Backbone":
        cfg["out_features"] = ["stage1", "stage2"]
    hf, _ = make_pair(cls_name, **cfg)
    hf.save_pretrained(tmp_path, safe_serialization=safe)
    ours = getattr(swinv2_fast, cls_name).from_pretrained(str(tmp_path))
    x = torch.randn(2, 3, cfg["image_size"], cfg["image_size"])
    for a, b in zip(outputs_of(ours, x), outputs_of(hf, x)):
        assert_close(a, b, name=f"{cls_name} from_pretrained")


@pytest.mark.parametrize("cls_name", CLASSES)
def test_save_pretrained_loads_in_transformers(tmp_path, cls_name):
    cfg = dict(CONFIGS["w7"])
    if cls_name == "Swinv2ForMaskedImageModeling":
        cfg["encoder_stride"] = 16
    if cls_name == "Swinv2Backbone":
        cfg["out_features"] = ["stem", "stage3"]
    _, ours = make_pair(cls_name, **cfg)
    ours.save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "swinv2" and config["architectures"] == [cls_name]
    assert "window_semantics" not in config and "attn_implementation" not in config
    hf = getattr(transformers, cls_name).from_pretrained(str(tmp_path)).eval()
    x = torch.randn(1, 3, 56, 56)
    for a, b in zip(outputs_of(ours, x), outputs_of(hf, x)):
        assert_close(a, b, name=f"{cls_name} in transformers")
    again = getattr(swinv2_fast, cls_name).from_pretrained(str(tmp_path))
    assert again.config == ours.config
    for a, b in zip(outputs_of(again, x), outputs_of(ours, x)):
        assert torch.equal(a, b)


def test_renamed_projection_keys_load(tmp_path):
    hf, _ours = make_pair("Swinv2ForImageClassification", **CONFIGS["w8"])
    hf.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    renamed = {}
    for key, value in weights.items():
        key = key.replace(".attention.self.query.", ".attention.self.q_proj.")
        key = key.replace(".attention.self.key.", ".attention.self.k_proj.")
        key = key.replace(".attention.self.value.", ".attention.self.v_proj.")
        key = key.replace(".attention.output.dense.", ".attention.o_proj.")
        renamed[key] = value
    assert any("q_proj" in k for k in renamed) and any("o_proj" in k for k in renamed)
    save_file(renamed, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = swinv2_fast.Swinv2ForImageClassification.from_pretrained(str(tmp_path))
    x = torch.randn(1, 3, 64, 64)
    assert_close(outputs_of(loaded, x)[0], outputs_of(hf, x)[0])


def test_sharded_checkpoint_loads(tmp_path):
    hf, _ = make_pair("Swinv2ForImageClassification", **CONFIGS["w8"])
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    loaded = swinv2_fast.Swinv2ForImageClassification.from_pretrained(str(tmp_path))
    x = torch.randn(1, 3, 64, 64)
    assert_close(outputs_of(loaded, x)[0], outputs_of(hf, x)[0])


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    """strict=True names every missing and unexpected key; the default (transformers') loads and lists them."""
    hf, _ = make_pair("Swinv2ForImageClassification", **CONFIGS["w8"])
    hf.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    dropped = "swinv2.encoder.layers.1.blocks.0.attention.self.logit_scale"
    del weights[dropped]
    weights["swinv2.encoder.layers.1.blocks.0.attention.self.surprise"] = torch.zeros(1)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError) as info:
        swinv2_fast.Swinv2ForImageClassification.from_pretrained(str(tmp_path), strict=True)
    message = str(info.value)
    assert "missing keys" in message and dropped in message
    assert "unexpected keys" in message and "attention.self.surprise" in message
    _, loading = swinv2_fast.Swinv2ForImageClassification.from_pretrained(str(tmp_path), output_loading_info=True)
    assert loading["missing_keys"] == {dropped}
    assert loading["unexpected_keys"] == {"swinv2.encoder.layers.1.blocks.0.attention.self.surprise"}


def test_heads_across_classes(tmp_path):
    """A classification checkpoint feeds a backbone (head dropped) and a base checkpoint feeds a classifier
    (head kept at initialisation), each reported, as in transformers."""
    report = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = report.append
    name = "swinv2_fast" if swinv2_fast.modeling._TransformersPreTrainedModel is None else "transformers.modeling_utils"
    logging.getLogger(name).addHandler(handler)
    try:
        hf, _ = make_pair("Swinv2ForImageClassification", **CONFIGS["w8"])
        hf.save_pretrained(tmp_path / "cls")
        backbone = swinv2_fast.Swinv2Backbone.from_pretrained(str(tmp_path / "cls"))
        hf_backbone = transformers.Swinv2Backbone.from_pretrained(str(tmp_path / "cls")).eval()
        x = torch.randn(1, 3, 64, 64)
        assert_close(outputs_of(backbone, x)[0], outputs_of(hf_backbone, x)[0])
        assert "another head" in "\n".join(r.getMessage() for r in report)

        base, _ = make_pair("Swinv2Model", **CONFIGS["w8"])
        base.save_pretrained(tmp_path / "base")
        classifier = swinv2_fast.Swinv2ForImageClassification.from_pretrained(str(tmp_path / "base"), num_labels=3)
        assert classifier.classifier.out_features == 3
        assert "left at initialisation" in "\n".join(r.getMessage() for r in report)
    finally:
        logging.getLogger(name).removeHandler(handler)


def test_num_labels_mismatch_raises(tmp_path):
    """transformers' contract: a mis-shaped weight raises RuntimeError (ignore_mismatched_sizes=True to reinit)."""
    hf, _ = make_pair("Swinv2ForImageClassification", **CONFIGS["w8"])
    hf.save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match=r"shape mismatches: .*classifier\.weight"):
        swinv2_fast.Swinv2ForImageClassification.from_pretrained(str(tmp_path), num_labels=7)


def test_missing_directory_and_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        swinv2_fast.Swinv2Model.from_pretrained(str(tmp_path))
    swinv2_fast.Swinv2Config(**CONFIGS["w8"]).save_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no weights"):
        swinv2_fast.Swinv2Model.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("override", [dict(out_features=["stage1", "stage2"]), dict(out_indices=[0, 2])])
def test_backbone_stages_chosen_when_loading_a_saved_directory(tmp_path, override):
    """transformers writes both out_features and out_indices; choosing one of them at load time re-derives
    the other, as transformers does, for a classifier's directory as for a backbone's."""
    hf, _ = make_pair("Swinv2ForImageClassification", **CONFIGS["w8"])
    hf.save_pretrained(tmp_path)
    theirs = transformers.Swinv2Backbone.from_pretrained(tmp_path, **override).eval()
    ours = swinv2_fast.Swinv2Backbone.from_pretrained(tmp_path, **override).eval()
    assert ours.out_features == theirs.out_features and ours.out_indices == list(theirs.out_indices)
    x = torch.randn(1, 3, 64, 64)
    for i, (a, b) in enumerate(zip(outputs_of(ours, x), outputs_of(theirs, x), strict=True)):
        assert_close(a, b, name=f"feature map {i}")
