"""README.md as a user reads it: its usage example runs as written, its commands are the ones CI runs."""

import math
import re
from pathlib import Path

import torch

import sparsemom_ext as sm

README = Path(__file__).resolve().parents[1] / "README.md"


def section(title: str) -> str:
    """The text of README.md's `## title` section, up to the next `## ` heading."""
    text = README.read_text(encoding="utf-8")
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert match, f"README.md has no '## {title}' section"
    return match.group(1)


def code_blocks(text: str, language: str):
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


def test_usage_example_runs_as_written(capsys):
    blocks = code_blocks(section("Usage"), "python")
    assert len(blocks) == 1, "the Usage section should hold one python example"
    torch.manual_seed(0)
    namespace = {"__name__": "__readme__"}
    exec(compile(blocks[0], f"{README}:Usage", "exec"), namespace)

    # What a user keeps after the loop: the last loss (it outlives the step), a sparse model.
    loss = namespace["loss"]
    assert isinstance(loss, torch.Tensor) and loss.grad_fn is not None and math.isfinite(loss.item())
    model = namespace["model"]
    layers = [m for m in model.modules() if isinstance(m, sm.SparseLinear)]
    assert len(layers) == 3
    total = sum(m.weight.numel() for m in layers)
    active = sum(int(m.mask.sum()) for m in layers)
    # sparsify's exact per-layer counts, and updates that move weights between layers
    # without changing the total.
    assert active == sum(round(0.05 * m.weight.numel()) for m in layers), (active, total)
    for m in layers:
        assert torch.count_nonzero(m.weight[~m.mask]) == 0
    out = capsys.readouterr().out
    assert f"epoch {namespace['epochs']}: loss" in out


def test_quick_start_is_what_ci_runs():
    """.ci/run takes the second line of the Quick start's first code block as its test command."""
    blocks = code_blocks(section("Quick start"), "bash")
    lines = blocks[0].strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("bash scripts/setup.sh && .venv/bin/python -m sparsemom_ext.train ")
    assert lines[1] == "bash scripts/setup.sh && .venv/bin/python -m pytest tests -q"


def test_readme_is_short_and_links_resolve():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    root = README.parent
    for target in re.findall(r"\]\(((?!https?:|#)[^)]+)\)", text):
        assert (root / target).exists(), f"README.md links to {target}, which is not in the repository"
