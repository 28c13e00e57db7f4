"""Keep TensorFlow's C++ start-up lines off the console of the command line tools.

TensorFlow's libraries log through absl before its log level is read, so ``TF_CPP_MIN_LOG_LEVEL`` does not silence
them: "All log messages before absl::InitializeLog() ...", oneDNN and CUDA notices, the CPU feature line and, on a
machine without a GPU, a failed ``cuInit``. ``quiet_tensorflow_startup`` arranges that the first ``import tensorflow``
(whoever does it, and only if anyone does) and its first device query run with the process's stderr sent to a
temporary file; what they print is then replayed, less those start-up lines. Nothing changes when the user set
``TF_CPP_MIN_LOG_LEVEL`` themselves: they chose what to see.
"""

import contextlib
import importlib.abc
import importlib.util
import os
import re
import sys
import tempfile

_STARTUP_LINE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\)"  # absl, once per library that logs early
    r"|[IW]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\] "  # absl info and warning lines
    r"|E\d{4} \d\d:\d\d:\d+\.\d+ +\d+ cuda_\w+\.cc:\d+\] failed call to cuInit"  # no GPU on this machine
    r"|To enable the following instructions: .* rebuild TensorFlow)"  # the CPU feature line's second half
)


def quiet_tensorflow_startup():
    """Install the quiet import of TensorFlow for this process (see the module docstring); returns whether it did."""
    if "TF_CPP_MIN_LOG_LEVEL" in os.environ or "tensorflow" in sys.modules:
        return False
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"  # what TensorFlow logs after its start-up: errors only
    if not any(isinstance(finder, _QuietFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _QuietFinder())
    return True


class _QuietFinder(importlib.abc.MetaPathFinder):
    """Finds ``tensorflow`` as the other finders do, with a loader that runs its import quietly; then steps aside."""

    def find_spec(self, name, path, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


class _QuietLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        with _stderr_without_startup_lines():
            self.loader.exec_module(module)
            module.config.list_physical_devices()  # the device query logs too (cuInit)


@contextlib.contextmanager
def _stderr_without_startup_lines():
    """Send file descriptor 2 to a temporary file for the block, then write what it got, less start-up lines."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            lines = capture.read().decode(errors="replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines if not _STARTUP_LINE.match(line)))
            sys.stderr.flush()
