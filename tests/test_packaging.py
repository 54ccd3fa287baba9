"""The kernels-only install: every dvae_kernels module imports only torch, triton, numpy, the
standard library and dvae_kernels itself (the base dependencies in pyproject.toml), and the
training module's third-party imports are covered by the ``train`` extra. Checked statically
(every import statement, also those inside functions), so it holds whatever is installed."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNEL_DEPS = {"torch", "triton", "numpy"}
# Import name -> distribution name, for the training module's third-party imports.
DIST = {"sklearn": "scikit-learn", "yaml": "pyyaml", "PIL": "pillow",
        "pytorch_fid": "pytorch-fid", "vector_quantize_pytorch": "vector-quantize-pytorch"}


def _top_level_imports(path: Path) -> dict[str, int]:
    """Top-level module names of every absolute import in ``path`` -> first line."""
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            found.setdefault(name.split(".")[0], node.lineno)
    return found


def _third_party(imports: dict[str, int], own: set[str]) -> dict[str, int]:
    std = set(sys.stdlib_module_names) | {"__future__"}
    return {m: ln for m, ln in imports.items() if m not in std and m not in own}


def test_dvae_kernels_imports_only_its_base_dependencies():
    files = sorted((ROOT / "dvae_kernels").rglob("*.py"))
    assert len(files) > 10
    bad = []
    for f in files:
        for mod, line in _third_party(_top_level_imports(f), {"dvae_kernels"}).items():
            if mod not in KERNEL_DEPS:
                bad.append(f"{f.relative_to(ROOT)}:{line} imports {mod}")
    assert not bad, "dvae_kernels must import only torch/triton/numpy/stdlib:\n" + "\n".join(bad)


def test_the_checker_sees_nested_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import os\ndef f():\n    import yaml\n    from . import x\n")
    assert _third_party(_top_level_imports(f), set()) == {"yaml": 3}


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _dist_name(req: str) -> str:
    for sep in "<>=!;[ ":
        req = req.split(sep)[0]
    return req.strip().lower()


def test_base_dependencies_are_the_kernels_imports():
    project = _pyproject()["project"]
    assert {_dist_name(r) for r in project["dependencies"]} == KERNEL_DEPS
    assert "transformers" in {_dist_name(r) for r in project["optional-dependencies"]["test"]}


def test_train_extra_covers_the_training_module():
    extras = _pyproject()["project"]["optional-dependencies"]
    provided = KERNEL_DEPS | {_dist_name(r) for r in extras["train"]}
    missing = []
    for f in sorted((ROOT / "dvae").rglob("*.py")):
        for mod, line in _third_party(_top_level_imports(f), {"dvae", "dvae_kernels"}).items():
            if DIST.get(mod, mod).lower() not in provided:
                missing.append(f"{f.relative_to(ROOT)}:{line} imports {mod}")
    assert not missing, "not in the train extra:\n" + "\n".join(missing)


def test_dvae_kernels_imports_and_runs_without_the_training_extras():
    """Every dvae_kernels module imports, and a drop-in path runs, in a process where the
    train extra's packages cannot be imported."""
    import os
    import subprocess

    code = """
import importlib, pkgutil, sys
# None in sys.modules is how Python spells "not installed": import raises
# ModuleNotFoundError and importlib.util.find_spec returns None.
for name in ("torchvision", "nvtx", "sklearn", "tqdm", "yaml", "tensorboard", "PIL",
             "matplotlib", "transformers", "dvae"):
    sys.modules[name] = None
import torch
import dvae_kernels
for m in pkgutil.iter_modules(dvae_kernels.__path__):
    if not m.name.startswith("_C"):
        importlib.import_module("dvae_kernels." + m.name)
head = dvae_kernels.FusedCategoricalHead(8, 20)
print(head.log_prob(torch.randn(3, 8), torch.tensor([0, 5, 19])).shape)
"""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "torch.Size([3])"


def test_dvae_command_without_the_training_extra_says_what_to_install():
    import os
    import subprocess

    code = """
import sys
sys.modules["yaml"] = None  # as after `pip install dvae` (kernels only)
from dvae.cli import main
sys.exit(main(["train", "steps=1"]))
"""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        "dvae: error: the dvae command needs the training extra (yaml is missing): "
        "pip install 'dvae[train]'"]


# --- the three floors: dvae_kernels <- dvae <- bench, and no cycle among their modules --------

PACKAGES = ("dvae_kernels", "dvae", "bench")


def _module_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (every import statement, lazy ones too)."""
    files = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    graph: dict[str, set[str]] = {}
    for mod, f in files.items():
        package = mod.split(".") if f.name == "__init__.py" else mod.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package[:len(package) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                targets = [f"{target}.{a.name}" if f"{target}.{a.name}" in files else target
                           for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in files and t != mod}
        graph[mod] = deps
    return graph


def test_floors_import_only_downwards():
    order = {pkg: i for i, pkg in enumerate(PACKAGES)}
    graph = _module_graph()
    up = [f"{m} imports {d}" for m, deps in graph.items() for d in deps
          if order[d.split(".")[0]] > order[m.split(".")[0]]]
    assert not up, "\n".join(up)
    # nothing outside tests/ imports from tests/
    for pkg in PACKAGES + ("examples",):
        for f in (ROOT / pkg).rglob("*.py"):
            assert "tests" not in _top_level_imports(f), f"{f.relative_to(ROOT)} imports tests"


def test_no_import_cycle():
    graph = _module_graph()
    assert "dvae.models.build" in graph["dvae.models"]
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_install_ships_the_library_and_the_training_module_only():
    """``pip install .`` installs dvae_kernels and dvae; bench and tests run from a checkout."""
    setuptools = pytest.importorskip("setuptools")
    include = _pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    found = setuptools.find_packages(str(ROOT), include=include)
    assert {p.split(".")[0] for p in found} == {"dvae", "dvae_kernels"}, found
