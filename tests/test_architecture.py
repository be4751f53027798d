"""House rules a script can check: parallelism stays out of model/data/pure modules, no forbidden dependencies, imports
point one way (no cycle; the tools, train.py and bench/ are leaves), and the README's file tour states true line
counts."""

import ast
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "minillava")
# Plus train.py, outside the package. plan.py: a fake process group and torch.distributed._tools.mem_tracker, for the
# tracing planner; atomic.py: rank 0 makes a checkpoint's folder; gather.py: the final weights leave the ranks;
# checkpoint.py / resume.py: DCP.
DIST_ALLOWED = {"distributed.py", "checkpoint.py", "resume.py", "atomic.py", "gather.py", "plan.py"}
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


# Every module of the package, as a path inside it (formats/llava.py); its stem names it in the import graph
# (formats.llava; a package's __init__.py is the package: formats).
MODULES = sorted(
    os.path.relpath(os.path.join(root, f), PACKAGE) for root, _, files in os.walk(PACKAGE) for f in files
    if f.endswith(".py")
)  # fmt: skip


def _stem(module: str) -> str:
    stem = module.removesuffix(".py").replace(os.sep, ".")
    return stem.removesuffix(".__init__") if stem != "__init__" else stem


STEMS = {_stem(m) for m in MODULES}


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


TOOLS = {"export", "generate", "check_data", "demo", "plan"}  # python -m minillava.<tool>: leaves, nothing imports them


def _package_imports(path: str) -> set[str]:
    """The minillava modules (file stems) a file imports, lazy and TYPE_CHECKING imports included; `train` and
    `bench` stand for the trainer script and the benchmark package."""
    with open(path) as f:
        tree = ast.parse(f.read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            subs = [f"{node.module}.{a.name}" for a in node.names] if node.module == "minillava" else []
            modules = [node.module, *subs]
        else:
            continue
        for m in modules:
            top, _, rest = m.partition(".")
            if top == "minillava" and rest:
                while rest not in STEMS and "." in rest:  # minillava.formats.read_settings: the package
                    rest = rest.rpartition(".")[0]
                names.add(rest)
            elif top in ("train", "bench"):
                names.add(top)
    return names


def _graph() -> dict[str, set[str]]:
    return {_stem(m): _package_imports(os.path.join(PACKAGE, m)) & STEMS for m in MODULES}


def test_package_imports_have_no_cycle():
    graph, done, path = _graph(), set(), []

    def visit(node: str) -> None:
        if node in path:
            raise AssertionError("import cycle: " + " -> ".join([*path[path.index(node) :], node]))
        if node in done:
            return
        path.append(node)
        for dep in sorted(graph[node]):
            visit(dep)
        path.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)


@pytest.mark.parametrize("name", MODULES)
def test_package_modules_import_no_tool_train_or_bench(name):
    stem = _stem(name)
    bad = _package_imports(os.path.join(PACKAGE, name)) & {"train", "bench", *(TOOLS - {stem})}
    if stem in TOOLS:  # a tool may build on another tool (demo evaluates through generate), never on train/bench
        bad -= TOOLS
    assert not bad, f"minillava/{name} imports {sorted(bad)}"


@pytest.mark.parametrize("path", ["train.py", "minillava/config.py"])
def test_trainer_and_config_import_no_tool(path):
    bad = _package_imports(os.path.join(REPO, path)) & (TOOLS | {"bench"})
    assert not bad, f"{path} imports {sorted(bad)}"


def test_model_is_pure_architecture():
    """model.py imports no format, output or distributed code: formats builds on it, never the other way round."""
    imports = {m.split(".")[0] for m in _package_imports(os.path.join(PACKAGE, "model.py"))}
    assert not imports & {"formats", "outputs", "checkpoint", "distributed"}


def test_readme_quick_start_is_the_two_commands_ci_runs():
    """The README's quick start: exactly two commands, each setting itself up; .ci/run runs the second one, and
    nothing in the repository cites a document outside it."""
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    block = readme.split("## The two commands", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert commands == ["bash configs/demo.sh", "bash scripts/test.sh"]
    with open(os.path.join(REPO, ".ci", "run")) as f:
        assert "bash scripts/test.sh" in f.read()
    for script in ("configs/demo.sh", "scripts/test.sh"):
        with open(os.path.join(REPO, script)) as f:
            assert "source scripts/setup.sh" in f.read(), script
    outside = re.compile(r"llava-reference\.md|house-style\.md|peers\.md|\.\./shared")
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if not d.startswith(".") or d == ".ci"]
        for name in files:
            if name.endswith((".py", ".md", ".sh", ".toml", ".json", ".txt")) or root.endswith(".ci"):
                with open(os.path.join(root, name), errors="ignore") as f:
                    assert not outside.search(f.read()), os.path.join(root, name)


def _calls_in_order(fn: ast.FunctionDef) -> list[ast.Call]:
    return sorted((n for n in ast.walk(fn) if isinstance(n, ast.Call)), key=lambda n: (n.lineno, n.col_offset))


def _reading_path(path: str, function: str, seen: set, out: list) -> bool:
    """Append (module, call) for each call into another minillava module that `function` of `path` makes, in source
    order, reading that file's own helpers inline; step.build_model is followed into its body. True once it was."""
    with open(os.path.join(REPO, path)) as f:
        tree = ast.parse(f.read())
    where = {a.asname or a.name: (n.module.removeprefix("minillava.") if n.module != "minillava" else a.name)
             for n in tree.body if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("minillava")
             for a in n.names}  # fmt: skip
    own = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    for call in _calls_in_order(own[function]):
        f = call.func
        name = f.id if isinstance(f, ast.Name) else f"{f.value.id}.{f.attr}" if isinstance(f, ast.Attribute) and \
            isinstance(f.value, ast.Name) else None  # fmt: skip
        if name in own and (path, name) not in seen:
            if _reading_path(path, name, seen | {(path, name)}, out):
                return True
        elif name and name.split(".")[0] in where:
            out.append((where[name.split(".")[0]], name))
            if out[-1] == ("step", "build_model"):
                _reading_path("minillava/step.py", "build_model", {("minillava/step.py", "build_model")}, out)
                return True
    return False


def test_main_reads_top_to_bottom_through_build_model():
    """Following the config from train.main through step.build_model: main top to bottom, each file's own helpers
    read inline, every call into another minillava module a stop. Today 15 stops and 4 returns to a file already
    left (config, to print it once the run's folder is claimed; distributed, formats/run.py and distributed again:
    the layout, rank 0's weights, their load); it was 32 stops and 21 returns. A change that adds stops or returns
    should make the path shorter elsewhere."""
    calls: list = []
    assert _reading_path("train.py", "main", {("train.py", "main")}, calls)
    stops = [module for i, (module, _) in enumerate(calls) if i == 0 or calls[i - 1][0] != module]
    returns = [module for i, module in enumerate(stops) if module in stops[:i]]
    assert len(stops) <= 15 and len(returns) <= 4, (stops, returns)
