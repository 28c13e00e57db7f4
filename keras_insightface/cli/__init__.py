"""The console command: ``keras-insightface <subcommand> [arguments]``, also ``python -m keras_insightface``.

Each subcommand is a module of this package with ``build_parser(prog)`` and ``main(argv, prog)``; the parsers import
no TensorFlow, so ``--help`` answers at once, and the work is imported only after the arguments are read. The
checkout's root scripts (``python train.py ...``) run the same subcommands through ``entry_point``.
"""

import importlib
import os
import pkgutil
import sys

import keras_insightface
from keras_insightface.cli.quiet import quiet_tensorflow_startup
from keras_insightface.utils import run_main

PROG = "keras-insightface"
COMMANDS = {  # subcommand: (module in this package, what it does)
    "train": ("train", "train from a recipe file (--config) or run the demo (--demo)"),
    "evals": ("evals", "evaluate a model: verification .bin files, a folder of aligned faces, photos"),
    "ijb": ("ijb", "IJB-B / IJB-C 1:1 verification and 1:N identification"),
    "prepare": ("prepare", "data: RecordIO <-> folders, shards, .bin files, face alignment, the demo dataset"),
    "export": ("export", "export a basic model to TFLite / SavedModel / ONNX"),
    "pretrained": ("pretrained", "import an insightface .onnx, arcface_torch .pth or Keras_insightface .h5"),
    "plot": ("plot", "plot training histories (*_hist.json) into a picture"),
    "drop-top-k": ("drop_top_k", "sub-center ArcFace cleaning: drop the images far from their dominant center"),
    "distill": ("distill", "teacher embeddings of a dataset, for knowledge distillation"),
}


def command_module(name):
    """The module of subcommand ``name`` (``keras_insightface.cli.<module>``)."""
    return importlib.import_module(f"keras_insightface.cli.{COMMANDS[name][0]}")


def run_command(name, argv=None, prog=None):
    """Run subcommand ``name`` with ``argv`` (default: this process's arguments); returns the exit status.

    Expected errors (bad input) print one line and give status 2; TensorFlow's start-up lines stay off the console.
    """
    prog = prog or f"{PROG} {name}"
    argv = sys.argv[1:] if argv is None else list(argv)
    quiet_tensorflow_startup()
    module = command_module(name)
    return run_main(lambda args: module.main(args, prog), argv, prog)


def _usage():
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name.ljust(width)}  {summary}" for name, (_, summary) in COMMANDS.items())
    return (
        f"usage: {PROG} <subcommand> [arguments]   ({PROG} <subcommand> --help for its arguments)\n\n"
        f"Face-recognition training and evaluation on Keras 3 (keras_insightface {keras_insightface.__version__}).\n\n"
        f"subcommands:\n{rows}\n"
    )


def main(argv=None):
    """``keras-insightface <subcommand> ...``: dispatch to the subcommand; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(), end="")
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"{PROG} {keras_insightface.__version__}")
        return 0
    if argv[0] not in COMMANDS:
        print(f"{PROG}: error: unknown subcommand {argv[0]!r}; one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return run_command(argv[0], argv[1:])


def entry_point(module_name, target, command=None):
    """What a checkout's root script does: imported (``import train``), it becomes the package module ``target``
    itself under its short name (one module object, not a copy, submodules included); run as a script
    (``python train.py ...``), it runs subcommand ``command``."""
    if module_name == "__main__":
        if command is None:
            sys.exit(f"{os.path.basename(sys.argv[0])} is a library module; the commands are: {PROG} --help")
        sys.exit(run_command(command, prog=os.path.basename(sys.argv[0])))
    module = importlib.import_module(target)
    for info in pkgutil.iter_modules(getattr(module, "__path__", [])):
        importlib.import_module(f"{target}.{info.name}")
    sys.modules[module_name] = module
    for name, submodule in list(sys.modules.items()):  # a package's submodules under the short name too
        if name.startswith(target + "."):
            sys.modules[module_name + name[len(target) :]] = submodule
