"""House rules a script can check: parallelism stays out of model/data/pure modules, no forbidden dependencies, and
the README's file tour states true line counts."""

import ast
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "minillava")
DIST_ALLOWED = {"distributed.py", "checkpoint.py", "outputs.py"}  # plus train.py, outside the package
FORBIDDEN = {"accelerate", "deepspeed", "tyro", "draccus"}


def _imports(path: str) -> set[str]:
    with open(path) as f:
        tree = ast.parse(f.read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


MODULES = sorted(f for f in os.listdir(PACKAGE) if f.endswith(".py"))


@pytest.mark.parametrize("name", MODULES)
def test_torch_distributed_only_where_allowed(name):
    imports = _imports(os.path.join(PACKAGE, name))
    uses_dist = any(i == "torch.distributed" or i.startswith("torch.distributed.") for i in imports)
    assert not uses_dist or name in DIST_ALLOWED, f"minillava/{name} imports torch.distributed"


@pytest.mark.parametrize("name", [*MODULES, "../train.py"])
def test_no_forbidden_dependencies(name):
    imports = _imports(os.path.join(PACKAGE, name))
    bad = {i for i in imports if i.split(".")[0] in FORBIDDEN or i == "transformers.Trainer"}
    assert not bad, f"{name} imports {bad}"


def test_readme_file_tour_line_counts_are_true():
    with open(os.path.join(REPO, "README.md")) as f:
        rows = re.findall(r"^\| `([^`]+)` \| (\d+) \|", f.read(), flags=re.M)
    assert rows, "README has no file tour"
    listed = {path for path, _ in rows}
    for path, count in rows:
        with open(os.path.join(REPO, path)) as f:
            actual = sum(1 for _ in f)
        assert int(count) == actual, f"README says {path} has {count} lines, it has {actual}"
    missing = {f"minillava/{m}" for m in MODULES} - listed - {"minillava/__init__.py"}
    assert not missing and "train.py" in listed, f"README file tour misses {missing or 'train.py'}"
