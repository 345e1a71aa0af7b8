"""The README's "Use" snippets run as written, in order, in one namespace (as a reader would paste them).

Downloads are replaced by files written here with random weights under the names the snippets use: a
transformers-saved classifier directory "swinv2-tiny-patch4-window8-256" (a small model at the published
input size, 256, window 8 and 1000 classes) and an official-layout checkpoint of timm's SwinV2-T.
"""

import os
import re

import pytest
import torch
import transformers

import swinv2_fast

from _utils import official_checkpoint_from_timm

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def use_section_snippets():
    with open(README, encoding="utf-8") as fh:
        text = fh.read()
    section = text[text.index("\n## Use\n") : text.index("\n### Choosing the implementation")]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_use_section_has_snippets():
    snippets = use_section_snippets()
    assert len(snippets) >= 5
    assert "import torch" in snippets[0] and "import swinv2_fast" in snippets[0]


@pytest.fixture
def downloads(tmp_path, monkeypatch):
    """The files the snippets name, written with random weights, and the working directory they live in."""
    timm = pytest.importorskip("timm")

    config = transformers.Swinv2Config(
        image_size=256,
        patch_size=4,
        window_size=8,
        embed_dim=16,
        depths=[1, 1],
        num_heads=[1, 2],
        num_labels=1000,
        drop_path_rate=0.0,
    )
    transformers.Swinv2ForImageClassification(config).save_pretrained(tmp_path / "swinv2-tiny-patch4-window8-256")
    torch.save(
        official_checkpoint_from_timm(timm.create_model("swinv2_tiny_window8_256")),
        tmp_path / "swinv2_tiny_patch4_window8_256.pth",
    )
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_use_section_runs_as_written(downloads):
    namespace = {"__name__": "readme"}
    for i, snippet in enumerate(use_section_snippets()):
        exec(compile(snippet, f"README.md 'Use' snippet {i}", "exec"), namespace)
    # what the snippets promise
    assert namespace["logits"].shape == (2, 1000)
    for name in ("out", "out-bf16", "run/final", "fast"):
        assert os.path.isfile(downloads / name / "config.json"), name
    assert transformers.Swinv2ForImageClassification.from_pretrained(downloads / "out-bf16").dtype == torch.bfloat16
    assert type(namespace["reloaded"]) is transformers.Swinv2ForImageClassification
    assert type(namespace["model"]) is swinv2_fast.Swinv2ForImageClassification
    assert namespace["model"].config.num_labels == 10
