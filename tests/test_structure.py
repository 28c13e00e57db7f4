"""The house rules of the code base, checked: one package whose subpackages import only downwards and never in a
cycle, thin root scripts, short functions, a short scheduler, code that explains itself without citing documents
outside the repository, and one model loader that every CLI uses."""

import ast
import os
import re
import subprocess
import sys

import keras
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "keras_insightface"
MAX_FUNCTION_LINES = 60
MAX_ROOT_SCRIPT_LINES = 25  # code lines of a checkout entry point
# the project's design notes and issue tracker, which are not part of the repository
CITATIONS = re.compile("SP" + "EC|the " + "seeds|" + r"\b[Ii]ssue #?\d")
# Each subpackage's layer: a module may import its own layer and the layers below, never a layer above.
LAYERS = {
    "cli": 5,
    "recipes": 5,
    "tools": 4,
    "training": 4,
    "evaluation": 3,
    "models": 2,
    "nn": 1,
    "data": 1,
    "faces": 0,
    "utils": 0,
}


def _package_files():
    """Every module of the package, as paths relative to the checkout (recipes are package data, not modules)."""
    found = []
    for folder, _, names in os.walk(os.path.join(ROOT, PACKAGE)):
        rel = os.path.relpath(folder, ROOT)
        found += [os.path.join(rel, name) for name in names if name.endswith(".py")]
    return sorted(path for path in found if os.sep + "recipes" + os.sep not in path)


def _root_scripts():
    scripts = [name for name in os.listdir(ROOT) if name.endswith(".py") and name != "setup.py"]
    return sorted(scripts + [os.path.join("backbones", "__init__.py")])


PACKAGE_FILES = _package_files()
LIBRARY = PACKAGE_FILES + _root_scripts()


def _tree(path):
    with open(os.path.join(ROOT, path)) as ff:
        return ast.parse(ff.read(), path)


def _module_name(path):
    parts = os.path.splitext(path)[0].split(os.sep)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package_imports(path):
    """The package modules ``path`` imports anywhere (module level or inside functions), as dotted names."""
    found = set()
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith(PACKAGE + ".")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith(PACKAGE):
            modules = {f"{node.module}.{alias.name}" for alias in node.names}
            found |= {name for name in modules if name in MODULES} or {node.module}
    return {name for name in found if name != PACKAGE}


MODULES = {_module_name(path) for path in PACKAGE_FILES}
GRAPH = {_module_name(path): _package_imports(path) for path in PACKAGE_FILES}


def _layer(module):
    return LAYERS[module.split(".")[1]]


def test_every_import_inside_the_package_names_the_package():
    bare_names = {name.split(".")[-1] for name in MODULES if name != PACKAGE} | {"backbones", "myCallbacks", "IJB_evals"}
    bare = []
    for path in PACKAGE_FILES:
        for node in ast.walk(_tree(path)):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            bare += [f"{path}:{node.lineno} {name}" for name in names if name.split(".")[0] in bare_names]
    assert not bare, bare


def test_subpackages_import_only_downwards():
    upward = [
        f"{module} -> {target}"
        for module, targets in GRAPH.items()
        if module.count(".") > 1 or module.endswith("utils")  # the package top is the lazy public API
        for target in targets
        if _layer(target) > _layer(module)
    ]
    assert not upward, upward


def test_nothing_but_the_fronts_imports_the_scheduler():
    importers = sorted(module for module, targets in GRAPH.items() if f"{PACKAGE}.training.train" in targets)
    assert importers == [f"{PACKAGE}.cli.train"], importers


def test_no_import_cycles():
    def cycle_from(start):
        stack, on_stack, done = [(start, iter(sorted(GRAPH[start])))], [start], set()
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop(), on_stack.pop()
                done.add(node)
            elif child in on_stack:
                return on_stack[on_stack.index(child) :] + [child]
            elif child not in done:
                stack.append((child, iter(sorted(GRAPH.get(child, ())))))
                on_stack.append(child)
        return None

    cycles = [cycle for cycle in map(cycle_from, sorted(GRAPH)) if cycle]
    assert not cycles, f"import cycles: {cycles}"


def test_root_scripts_are_thin_entry_points():
    fat = []
    for path in _root_scripts():
        with open(os.path.join(ROOT, path)) as ff:
            code = [line for line in ff if line.strip() and not line.lstrip().startswith(("#", '"""', "``"))]
        if len(code) > MAX_ROOT_SCRIPT_LINES or "entry_point(__name__" not in "".join(code):
            fat.append(f"{path} ({len(code)} lines)")
    assert not fat, fat


def test_functions_are_short():
    long_ones = [
        f"{path}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path in LIBRARY
        for node in ast.walk(_tree(path))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long_ones, long_ones


def test_train_module_stays_a_short_scheduler():
    with open(os.path.join(ROOT, PACKAGE, "training", "train.py")) as ff:
        assert len(ff.read().splitlines()) < 350


def test_code_cites_no_documents_outside_the_repository():
    recipes = os.path.join(PACKAGE, "recipes")
    paths = LIBRARY + [os.path.join(recipes, name) for name in os.listdir(os.path.join(ROOT, recipes))]
    paths += [os.path.join("tests", name) for name in os.listdir(os.path.join(ROOT, "tests"))]
    paths += [os.path.join("bench", name) for name in os.listdir(os.path.join(ROOT, "bench"))]
    citing = []
    for path in (path for path in paths if path.endswith(".py")):
        with open(os.path.join(ROOT, path)) as ff:
            citing += [f"{path}:{ii}" for ii, line in enumerate(ff, 1) if CITATIONS.search(line)]
    assert not citing, citing


@pytest.mark.slow
def test_clis_load_models_with_custom_layers_in_a_fresh_process(demo_small, tmp_path):
    """A basic model built from the zoo's custom layers (ResNeSt's split attention, StochasticDepth) evaluates
    from the command line in a new interpreter, which imports nothing but the script."""
    from keras_insightface.evaluation import ijb
    from keras_insightface.models import zoo as models
    from keras_insightface.models.backbones import resnest

    inputs = keras.Input((32, 32, 3))
    branch = keras.layers.Conv2D(8, 3, padding="same")(inputs)
    attention = resnest.RSoftmax(radix=2)(keras.layers.Conv2D(8, 1)(branch))
    merged = models.StochasticDepth(0.8)([resnest.SplitSum(radix=2)(attention), keras.layers.Conv2D(4, 1)(branch)])
    embedding = keras.layers.Dense(8, name="embedding")(keras.layers.GlobalAveragePooling2D()(merged))
    model_path = str(tmp_path / "custom.keras")
    keras.Model(inputs, embedding).save(model_path)
    env = dict(os.environ, PYTHONPATH="")

    def run(command, *args):
        done = subprocess.run(
            [sys.executable, "-m", PACKAGE, command, "-m", model_path, *args],
            capture_output=True,
            text=True,
            cwd=str(tmp_path),
            env=env,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    row = next(line for line in run("evals", "-t", demo_small["bin_path"]).splitlines() if "| demo_eval |" in line)
    assert 0.0 <= float(row.split("|")[2]) <= 1.0
    ijb.make_synthetic_ijb(str(tmp_path / "ijb"), num_subjects=3, templates_per_subject=2)
    table = run("ijb", "-d", str(tmp_path / "ijb"), "--result_dir", str(tmp_path / "result"))
    assert "| custom_N0D1F1 |" in table
