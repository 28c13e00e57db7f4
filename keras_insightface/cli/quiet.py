"""Keep TensorFlow's C++ log lines off the console of the command line tools.

TensorFlow's libraries log through absl before its log level is read, so ``TF_CPP_MIN_LOG_LEVEL`` does not silence
them: "All log messages before absl::InitializeLog() ...", oneDNN and CUDA notices, the CPU feature line and, on a
machine without a GPU, a failed ``cuInit``. ``quiet_tensorflow_startup`` arranges that the first ``import tensorflow``
(whoever does it, and only if anyone does) and its first device query run with the process's stderr passing
through a filter that drops those start-up lines. Later, TensorFlow logs nothing
(``TF_CPP_MIN_LOG_LEVEL=3``): its errors reach the user as exceptions, which the commands report in one line (its
log would add, say, one "Premature end of JPEG data" line per bad image of a folder already named in that line).
Nothing changes when the user set ``TF_CPP_MIN_LOG_LEVEL`` themselves: they chose what to see.
"""

import importlib.abc
import importlib.util
import os
import re
import sys

from keras_insightface.utils import filtered_stderr

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
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"  # nothing from TensorFlow's C++ log after its start-up
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
        with filtered_stderr(_STARTUP_LINE):
            self.loader.exec_module(module)
            module.config.list_physical_devices()  # the device query logs too (cuInit)
