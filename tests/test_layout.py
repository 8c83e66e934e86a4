"""The package's shape, kept: imports run one way down the layers README's "Where things are" names, no module
grows past 400 lines, and no code outside dpop.losses branches on a loss name."""

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "dpop"
# lower layers never import higher ones (lazily inside a function neither)
LAYERS = {"errors": 0, "speed": 0, "losses": 1, "precision": 1, "config": 2, "tasks": 2, "models": 3,
          "distributed": 3, "data": 4, "scoring": 5, "training": 6, "evaluation": 7, "reporting": 8, "analysis": 9,
          "improve": 10, "demo": 10, "cli": 11, "__main__": 12, "__init__": 13}
MODULES = sorted(PACKAGE.rglob("*.py"))


def _top(path: Path) -> str:
    return path.relative_to(PACKAGE).with_suffix("").parts[0]


def _dpop_imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dpop."):
            yield node.module, node.lineno
        elif isinstance(node, ast.Import):
            yield from ((alias.name, node.lineno) for alias in node.names if alias.name.startswith("dpop."))


def test_every_top_level_part_has_a_layer():
    assert {_top(path) for path in MODULES} <= set(LAYERS)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_run_one_way(path):
    here = _top(path)
    upward = [f"{module} (line {line})" for module, line in _dpop_imports(path)
              if module.split(".")[1] != here and LAYERS[module.split(".")[1]] > LAYERS[here]]
    assert not upward, f"{path.name} (layer {here}) imports from above it: {upward}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_is_over_400_lines(path):
    assert len(path.read_text().splitlines()) <= 400


def test_only_the_losses_package_names_the_sft_loss_in_code():
    """SFT is a registered loss: the loop, the reference, the data and stopping ask its LossSpec."""
    pattern = re.compile(r"""is_sft|[=!]= ?["']sft["']|["']sft["'] ?[=!]=|in \([^)]*["']sft["']""")
    found = [f"{path.relative_to(PACKAGE)}:{number}" for path in MODULES if _top(path) != "losses"
             for number, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not found
