"""The house rules of the code base, checked: no import cycles, short functions, a short scheduler, code that
explains itself without citing documents outside the repository, and one model loader that every CLI uses."""

import ast
import os
import re
import subprocess
import sys

import keras
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRARY = sorted(
    [name for name in os.listdir(ROOT) if name.endswith(".py") and name != "setup.py"]
    + [os.path.join("backbones", name) for name in os.listdir(os.path.join(ROOT, "backbones")) if name.endswith(".py")]
)
MAX_FUNCTION_LINES = 60
# the project's design notes and issue tracker, which are not part of the repository
CITATIONS = re.compile("SP" + "EC|the " + "seeds|" + r"\b[Ii]ssue #?\d")


def _tree(path):
    with open(os.path.join(ROOT, path)) as ff:
        return ast.parse(ff.read(), path)


def _project_imports(path, modules):
    """Project modules imported anywhere in ``path`` (module level or inside functions)."""
    found = set()
    for node in ast.walk(_tree(path)):
        names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        found |= {name.split(".")[0] for name in names if name.split(".")[0] in modules}
    return found


def test_no_import_cycles():
    modules = {os.path.splitext(path)[0].split(os.sep)[-1] for path in LIBRARY if os.sep not in path} | {"backbones"}
    graph = {os.path.splitext(path)[0]: _project_imports(path, modules) for path in LIBRARY if os.sep not in path}
    graph["backbones"] = set().union(*(_project_imports(path, modules) for path in LIBRARY if os.sep in path))
    graph["backbones"].discard("backbones")

    def cycle_from(start):
        stack, on_stack, done = [(start, iter(sorted(graph[start])))], [start], set()
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop(), on_stack.pop()
                done.add(node)
            elif child in on_stack:
                return on_stack[on_stack.index(child) :] + [child]
            elif child not in done:
                stack.append((child, iter(sorted(graph.get(child, ())))))
                on_stack.append(child)
        return None

    cycles = [cycle for cycle in map(cycle_from, sorted(graph)) if cycle]
    assert not cycles, f"import cycles: {cycles}"


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
    with open(os.path.join(ROOT, "train.py")) as ff:
        assert len(ff.read().splitlines()) < 350


def test_code_cites_no_documents_outside_the_repository():
    paths = LIBRARY + [os.path.join("tests", name) for name in os.listdir(os.path.join(ROOT, "tests"))]
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
    import models
    from backbones import resnest

    inputs = keras.Input((32, 32, 3))
    branch = keras.layers.Conv2D(8, 3, padding="same")(inputs)
    attention = resnest.RSoftmax(radix=2)(keras.layers.Conv2D(8, 1)(branch))
    merged = models.StochasticDepth(0.8)([resnest.SplitSum(radix=2)(attention), keras.layers.Conv2D(4, 1)(branch)])
    embedding = keras.layers.Dense(8, name="embedding")(keras.layers.GlobalAveragePooling2D()(merged))
    model_path = str(tmp_path / "custom.keras")
    keras.Model(inputs, embedding).save(model_path)
    env = dict(os.environ, PYTHONPATH="")

    def run(script, *args):
        done = subprocess.run(
            [sys.executable, os.path.join(ROOT, script), "-m", model_path, *args],
            capture_output=True,
            text=True,
            cwd=str(tmp_path),
            env=env,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    row = next(line for line in run("evals.py", "-t", demo_small["bin_path"]).splitlines() if "| demo_eval |" in line)
    assert 0.0 <= float(row.split("|")[2]) <= 1.0
    import IJB_evals

    IJB_evals.make_synthetic_ijb(str(tmp_path / "ijb"), num_subjects=3, templates_per_subject=2)
    table = run("IJB_evals.py", "-d", str(tmp_path / "ijb"), "--result_dir", str(tmp_path / "result"))
    assert "| custom_N0D1F1 |" in table
