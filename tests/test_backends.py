"""The loss and head tests on the JAX backend, from the one test command: a pytest subprocess with
``KERAS_BACKEND=jax`` on a simulated machine without TensorFlow (as a GPU box with only JAX)."""

import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JAX_TEST_FILES = ["tests/test_losses.py", "tests/test_partial_fc.py"]
MIN_PASSED_ON_JAX = 85  # the formula tests of both files; far fewer means they were skipped or not collected


def _without_tensorflow(folder):
    """A folder whose ``tensorflow`` package fails to import, to put first on ``PYTHONPATH``."""
    package = folder / "tensorflow"
    package.mkdir()
    (package / "__init__.py").write_text('raise ImportError("TensorFlow is not installed on this machine")\n')
    return str(folder)


def _count(summary, outcome):
    """How many tests had ``outcome`` ("passed", "failed", ...) in pytest's last summary line (0 when absent)."""
    found = re.search(rf"(\d+) {outcome}", summary)
    return int(found.group(1)) if found else 0


def test_loss_and_head_tests_pass_on_jax_without_tensorflow(tmp_path):
    env = dict(
        os.environ,
        KERAS_BACKEND="jax",
        PYTHONPATH=os.pathsep.join([_without_tensorflow(tmp_path), REPO]),
        JAX_PLATFORMS="cpu",
    )
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-n",
        "0",
        "-p",
        "no:cacheprovider",
        *JAX_TEST_FILES,
        "-m",
        "not slow",
    ]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    summary = output.strip().splitlines()[-1] if output.strip() else ""
    tail = "\n".join(output.splitlines()[-40:])
    assert proc.returncode == 0, tail
    assert _count(summary, "failed") == 0 and _count(summary, "error") == 0, tail
    assert _count(summary, "passed") >= MIN_PASSED_ON_JAX, tail
