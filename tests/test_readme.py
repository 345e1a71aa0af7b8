"""Every Python snippet of README.md and docs/*.md runs as written: each page's ```python blocks in order, in one
namespace (as a reader would paste them), in a temporary working directory.

A block that cannot run here is fenced ```python no-run, and the paragraph just before it says why ("not run by
the tests: needs a CUDA device"); the tests fail on a no-run block without that reason. Shell commands are
```bash blocks and output is ```text: never run. Downloads the snippets name are replaced by files written here
with random weights: a transformers-saved classifier directory "swinv2-tiny-patch4-window8-256" (a small model
at the published input size, 256, window 8 and 1000 classes) and an official-layout checkpoint of timm's
SwinV2-T, "swinv2_tiny_patch4_window8_256.pth". Relative links between the pages and to source files must
resolve, anchors included.
"""

import os
import re
import shutil

import pytest
import torch
import transformers

import swinv2_fast

from _utils import official_checkpoint_from_timm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(os.path.join("docs", name) for name in os.listdir(os.path.join(ROOT, "docs")))
FENCE = re.compile(r"^```(.*)$")
LANGUAGES = {"python", "python no-run", "bash", "text"}
REASON = re.compile(r"not run by the tests: *([^.)\n]*\w)", flags=re.I)


def read(page):
    with open(os.path.join(ROOT, page), encoding="utf-8") as fh:
        return fh.read()


def blocks(page):
    """(line, info string, code, the paragraph before the fence) of every fenced block of `page`."""
    lines = read(page).split("\n")
    found, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j] == "```")
        before = i - 1
        while before >= 0 and not lines[before].strip():
            before -= 1
        start = before
        while start > 0 and lines[start - 1].strip():
            start -= 1
        paragraph = " ".join(lines[start : before + 1]) if before >= 0 else ""
        found.append((i + 1, match.group(1).strip(), "\n".join(lines[i + 1 : end]) + "\n", paragraph))
        i = end + 1
    return found


@pytest.mark.parametrize("page", PAGES)
def test_fences_are_tagged_and_skips_give_a_reason(page):
    for line, info, _, paragraph in blocks(page):
        assert info in LANGUAGES, f"{page}:{line}: fence language {info!r} is not one of {sorted(LANGUAGES)}"
        if info == "python no-run":
            assert REASON.search(paragraph), f"{page}:{line}: a no-run block needs 'not run by the tests: <why>'"


def test_every_page_is_reachable_from_the_readme():
    readme = read("README.md")
    for page in PAGES[1:]:
        assert f"]({page})" in readme, f"README.md does not link {page}"
        assert read(page).startswith("# "), page


def github_anchor(heading):
    """The id GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page):
    text = re.sub(r"^```.*?^```", "", read(page), flags=re.S | re.M)
    return {github_anchor(h) for h in re.findall(r"^#+ (.*)$", text, flags=re.M)}


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_resolve(page):
    text = re.sub(r"^```.*?^```", "", read(page), flags=re.S | re.M)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        assert os.path.exists(os.path.join(ROOT, resolved)), f"{page}: link {target!r} points nowhere"
        if anchor and resolved.endswith(".md"):
            assert anchor in anchors(resolved), f"{page}: link {target!r}: no such heading in {resolved}"


@pytest.fixture(scope="module")
def downloads(tmp_path_factory):
    """The files the snippets name as downloads, written once with random weights."""
    timm = pytest.importorskip("timm")
    folder = tmp_path_factory.mktemp("downloads")
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
    transformers.Swinv2ForImageClassification(config).save_pretrained(folder / "swinv2-tiny-patch4-window8-256")
    torch.save(
        official_checkpoint_from_timm(timm.create_model("swinv2_tiny_window8_256")),
        folder / "swinv2_tiny_patch4_window8_256.pth",
    )
    return folder


def check_readme(namespace, cwd):
    assert namespace["logits"].shape == (2, 10)
    assert transformers.Swinv2ForImageClassification.from_pretrained(cwd / "my-swinv2").config.num_labels == 10
    assert swinv2_fast.is_patched(namespace["hf_model"]) and swinv2_fast.is_patched(namespace["timm_model"])
    assert namespace["out"].shape == (2, 16 * 16, 32)


def check_models(namespace, cwd):
    for name in ("out", "out-bf16", "fast", "local-swinv2"):
        assert os.path.isfile(cwd / name / "config.json"), name
    assert transformers.Swinv2ForImageClassification.from_pretrained(cwd / "out-bf16").dtype == torch.bfloat16
    assert type(namespace["model"]) is swinv2_fast.Swinv2ForImageClassification
    assert namespace["model"].config.window_semantics == "timm"


def check_training(namespace, cwd):
    assert os.path.isfile(cwd / "run" / "final" / "config.json")
    assert type(namespace["reloaded"]) is transformers.Swinv2ForImageClassification
    assert namespace["trainer"].model.config.num_labels == 10


def check_benchmarks(namespace, cwd):
    assert namespace["model"].config.cpu_onednn_linear is False
    assert namespace["model"].config.cpu_inference_chunk_bytes == 0


CHECKS = {
    "README.md": check_readme,
    os.path.join("docs", "models.md"): check_models,
    os.path.join("docs", "training.md"): check_training,
    os.path.join("docs", "benchmarks.md"): check_benchmarks,
}


@pytest.mark.parametrize("page", PAGES)
def test_snippets_run_as_written(page, downloads, tmp_path, monkeypatch, capsys):
    for name in os.listdir(downloads):
        source = downloads / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "snippets"}
    ran, skipped = 0, []
    for line, info, code, paragraph in blocks(page):
        if info == "python":
            exec(compile(code, f"{page}:{line}", "exec"), namespace)
            ran += 1
        elif info == "python no-run":
            skipped.append(f"line {line}: {REASON.search(paragraph).group(1)}")
    if page in CHECKS:
        CHECKS[page](namespace, tmp_path)
    with capsys.disabled():
        print(f"\n[snippets] {page}: ran {ran}, skipped {len(skipped)}" + "".join(f"\n  skipped {s}" for s in skipped))
    assert ran or skipped or page not in CHECKS


def test_missing_model_error_says_how_to_make_a_local_one(tmp_path):
    """from_pretrained of a name that is neither a directory nor in the hub's local cache tells how to get a
    model without the hub."""
    with pytest.raises(FileNotFoundError) as raised:
        swinv2_fast.Swinv2ForImageClassification.from_pretrained("someone/not-downloaded", cache_dir=str(tmp_path))
    message = str(raised.value)
    assert "config.json" in message
    assert "Swinv2Config(" in message and "save_pretrained(" in message and "from_pretrained(" in message
    assert "swinv2_fast.from_timm" in message
