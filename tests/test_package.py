"""The library as users get it: one installable package with a console command; in a checkout, root scripts that are
the package's own modules; command lines that answer ``--help`` without TensorFlow and keep its C++ start-up lines
off the console; numeric flags checked before any work."""

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
from helpers import assert_drawn_png

import keras_insightface
from keras_insightface import cli
from keras_insightface.cli import quiet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT_MODULES = {  # the checkout's entry points and the package modules they are
    "train": "keras_insightface.training.train",
    "data": "keras_insightface.data.pipeline",
    "evals": "keras_insightface.evaluation.evals",
    "losses": "keras_insightface.nn.losses",
    "models": "keras_insightface.models.zoo",
    "myCallbacks": "keras_insightface.training.callbacks",
    "plot": "keras_insightface.evaluation.plot",
    "prepare_data": "keras_insightface.tools.prepare_data",
    "data_drop_top_k": "keras_insightface.tools.drop_top_k",
    "data_distiller": "keras_insightface.tools.distiller",
    "IJB_evals": "keras_insightface.evaluation.ijb",
    "export": "keras_insightface.tools.export",
    "pretrained": "keras_insightface.tools.pretrained",
    "backbones": "keras_insightface.models.backbones",
}
ROOT_COMMANDS = {  # root script: subcommand it runs
    "train.py": "train",
    "evals.py": "evals",
    "IJB_evals.py": "ijb",
    "prepare_data.py": "prepare",
    "export.py": "export",
    "pretrained.py": "pretrained",
    "plot.py": "plot",
    "data_drop_top_k.py": "drop-top-k",
    "data_distiller.py": "distill",
}
# A user's files with the names of the library's old top-level modules, each failing loudly when imported.
LOOK_ALIKES = ["utils", "config", "data", "models", "losses", "train", "evals", "plot", "backbones/__init__"]
ABSL_LINE = re.compile(r"^([IWEF]\d{4} \d\d:\d\d:\d\d|WARNING: All log messages before absl)", re.M)


def _without_tf_log_level():
    env = dict(os.environ, PYTHONPATH="")
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    return env


@pytest.fixture(scope="session")
def wheel(tmp_path_factory):
    """The wheel built from a copy of the checkout's package files (the checkout itself is left untouched)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("keras_insightface", "setup.py", "pyproject.toml", "README.md"):
        copy = shutil.copytree if os.path.isdir(os.path.join(ROOT, name)) else shutil.copy
        copy(os.path.join(ROOT, name), source / name)
    dist = tmp_path_factory.mktemp("dist")
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), "."]
    done = subprocess.run(command, cwd=source, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = dist.glob("keras_insightface-*.whl")
    return path


def test_the_wheel_holds_one_package_its_recipes_and_the_command(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        info = next(name for name in names if name.endswith(".dist-info/METADATA"))
        metadata = archive.read(info).decode()
        entry_points = archive.read(info.replace("METADATA", "entry_points.txt")).decode()
    top_level = {name.split("/")[0] for name in names}
    assert top_level == {"keras_insightface", f"keras_insightface-{keras_insightface.__version__}.dist-info"}
    shipped = sorted(os.path.basename(name) for name in names if name.startswith("keras_insightface/recipes/"))
    assert shipped == sorted(name for name in os.listdir(os.path.join(ROOT, "keras_insightface", "recipes")))
    assert "keras_insightface/models/backbones/resnet.py" in names
    assert f"\nVersion: {keras_insightface.__version__}\n" in metadata
    assert re.search(r"^keras-insightface = keras_insightface\.cli:main$", entry_points, re.M)


def _venv_with_wheel(wheel, where):
    """A new virtual environment with the wheel installed (not editable). Its dependencies come from this
    interpreter's site-packages through a path file, so nothing is downloaded; this checkout is not on its path."""
    venv = where / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True
    ).stdout.strip()
    ours = [path for path in sys.path if path.endswith("site-packages") and os.path.isdir(path)]
    with open(os.path.join(site, "outer_dependencies.pth"), "w") as ff:
        ff.write("\n".join(ours) + "\n")
    done = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], text=True)
    assert done.returncode == 0
    return venv


def _user_folder(path):
    """A research folder holding files named like the old top-level modules, each raising when imported."""
    for name in LOOK_ALIKES:
        target = path / f"{name}.py"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(f"raise RuntimeError('the user\\'s own {name}.py was imported')\n")
    return path


@pytest.mark.slow
def test_the_installed_wheel_works_beside_a_users_look_alike_files(wheel, tmp_path):
    venv = _venv_with_wheel(wheel, tmp_path)
    folder = _user_folder(tmp_path / "research")
    python, command = str(venv / "bin" / "python"), str(venv / "bin" / "keras-insightface")
    code = "import keras_insightface as kif; print(kif.__file__); print(len([getattr(kif, n) for n in kif.__all__]))"
    done = subprocess.run([python, "-c", code], cwd=folder, capture_output=True, text=True, env=_without_tf_log_level())
    assert done.returncode == 0, done.stderr[-3000:]
    where, count = done.stdout.split()
    assert where.startswith(str(venv)) and int(count) == len(keras_insightface.__all__)
    for run in (
        [command, "train", "--demo", "--smoke"],
        [python, "-m", "keras_insightface", "train", "--demo", "--smoke"],
    ):
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)
        done = subprocess.run(run, cwd=folder, capture_output=True, text=True, env=_without_tf_log_level())
        assert done.returncode == 0, done.stderr[-3000:]
        assert not ABSL_LINE.search(done.stderr), done.stderr[:2000]
        history = json.loads((folder / "checkpoints" / "smoke" / "demo_hist.json").read_text())
        assert len(history["loss"]) == 1 and history["loss"][0] > 0
    assert sorted(os.listdir(folder / "datasets")) == ["demo"]  # the demo's data and files land in the current folder


@pytest.mark.slow
def test_train_py_in_the_checkout_runs_the_demo_smoke_test_and_plot_py_draws_it(tmp_path):
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), "--demo", "--smoke"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    history = tmp_path / "checkpoints" / "smoke" / "demo_hist.json"
    assert (
        len(json.loads(history.read_text())["loss"]) == 1
        and (tmp_path / "checkpoints" / "smoke" / "demo_hist.png").exists()
    )
    picture = tmp_path / "demo.png"
    assert cli.main(["plot", str(history), "-o", str(picture)]) == 0
    assert_drawn_png(str(picture))


def test_root_modules_are_the_package_modules_themselves(monkeypatch):
    for name, target in ROOT_MODULES.items():
        assert importlib.import_module(name) is importlib.import_module(target), name
    import backbones.resnet

    import train
    from keras_insightface.models.backbones import resnet
    from keras_insightface.training import train as package_train

    assert backbones.resnet is resnet
    monkeypatch.setattr(train, "EMBEDDING_LAYER", "patched")  # one module: a patch shows under both names
    assert package_train.EMBEDDING_LAYER == "patched"
    assert isinstance(package_train.Train.__new__(train.Train), package_train.Train)


def test_every_subcommand_and_root_script_answers_help_without_tensorflow():
    probe = f"""
import runpy, sys
sys.path.insert(0, {ROOT!r})
from keras_insightface import cli
helps = {{}}
for name in cli.COMMANDS:
    try:
        cli.main([name, "--help"])
    except SystemExit as done:
        helps[name] = done.code
for script in {sorted(ROOT_COMMANDS)!r}:
    sys.argv = [script, "--help"]
    try:
        runpy.run_path({ROOT!r} + "/" + script, run_name="__main__")
    except SystemExit as done:
        helps[script] = done.code
heavy = sorted(name for name in ("tensorflow", "keras", "jax", "sklearn", "matplotlib") if name in sys.modules)
print(helps, heavy)
"""
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    helps, heavy = done.stdout.strip().splitlines()[-1].rsplit(" ", 1)
    assert eval(helps) == {name: 0 for name in [*cli.COMMANDS, *ROOT_COMMANDS]}  # noqa: S307 - our own output
    assert heavy == "[]"
    assert sorted(set(ROOT_COMMANDS.values())) == sorted(cli.COMMANDS)


def test_the_console_command_lists_its_subcommands_and_refuses_unknown_ones(capsys):
    assert cli.main([]) == 2
    usage = capsys.readouterr().out
    assert all(f"\n  {name} " in usage for name in cli.COMMANDS)
    assert cli.main(["--version"]) == 0 and keras_insightface.__version__ in capsys.readouterr().out
    assert cli.main(["trian"]) == 2
    assert capsys.readouterr().err.strip() == (
        "keras-insightface: error: unknown subcommand 'trian'; one of " + ", ".join(cli.COMMANDS)
    )


STARTUP_LINES = """\
WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
I0000 00:00:1796650429.952713    3978 port.cc:153] oneDNN custom operations are on. You may see slightly different
I0000 00:00:1796650429.953103    3978 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.
I0000 00:00:1796650430.016216    3978 cpu_feature_guard.cc:227] This TensorFlow binary is optimized to use available CPU
To enable the following instructions: AVX2 AVX512F AVX512_VNNI FMA, in other operations, rebuild TensorFlow with the
E0000 00:00:1796650435.420447    3978 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: Failed call to
"""
KEPT_LINES = """\
E0000 00:00:1796650435.420447    3978 op_kernel.cc:1830] OP_REQUIRES failed at save_restore_v2_ops.cc:219
/site-packages/keras/src/saving/saving_lib.py:869: UserWarning: Skipping variable loading for optimizer 'sgd'
"""


def test_only_tensorflow_startup_lines_are_dropped(monkeypatch):
    lines = (STARTUP_LINES + KEPT_LINES).splitlines(keepends=True)
    assert "".join(line for line in lines if not quiet._STARTUP_LINE.match(line)) == KEPT_LINES
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")  # the user's own choice is left alone
    before = list(sys.meta_path)
    assert quiet.quiet_tensorflow_startup() is False and sys.meta_path == before


def test_filtered_stderr_drops_only_the_lines_it_is_told_to(capfd):
    from keras_insightface import utils

    with utils.filtered_stderr(re.compile("noise")):
        os.write(2, b"noise 1\nkept 1\n\r 50%|bar\r100%|bar\nnoise 2\n")  # what a C library writes, and tqdm
        os.write(2, b"tail without a newline")
    assert capfd.readouterr().err == "kept 1\n\r 50%|bar\r100%|bar\ntail without a newline"
    os.write(2, b"noise after the block\n")
    assert capfd.readouterr().err == "noise after the block\n"


BAD_NUMBERS = [  # (subcommand arguments, the flag named in the one-line error)
    (["train", "--demo", "--epochs_scale", "-1"], "--epochs_scale"),
    (["train", "--demo", "--epochs_scale", "nan"], "--epochs_scale"),
    (["train", "--demo", "--epochs_scale", "0"], "--epochs_scale"),
    (["train", "--demo", "--batch_size", "0"], "--batch_size"),
    (["train", "--demo", "--batch_size", "2.5"], "--batch_size"),
    (["train", "--demo", "--lr_base", "inf"], "--lr_base"),
    (["evals", "-m", "m.keras", "-t", "x.bin", "-b", "-4"], "-b/--batch_size"),
    (["evals", "-m", "m.keras", "--folder", "f", "--max_pairs", "0"], "--max_pairs"),
    (["ijb", "-m", "m.keras", "-b", "0"], "-b/--batch_size"),
    (["prepare", "--demo", "d", "--classes", "-3"], "--classes"),
    (["prepare", "--to-shards", "x", "-o", "y", "--shards", "-1"], "--shards"),
    (["prepare", "--align", "x", "-o", "y", "--image_size", "0"], "--image_size"),
    (["export", "-m", "m.keras", "-n", "0"], "-n/--num_calibration"),
    (["pretrained", "m.onnx", "--check", "-1"], "--check"),
    (["plot", "h.json", "--limit_loss_max", "nan"], "--limit_loss_max"),
    (["drop-top-k", "-M", "m", "-D", "d", "-t", "181"], "-t/--deg_thresh"),
    (["distill", "-D", "d", "-L", "-2"], "-L/--limit"),
    (["distill", "-D", "d", "--scale", "-0.1"], "--scale"),
]


@pytest.mark.parametrize("argv, flag", BAD_NUMBERS, ids=[" ".join(argv) for argv, _ in BAD_NUMBERS])
def test_bad_numeric_flags_are_refused_in_one_line_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(argv)
    assert done.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"keras-insightface {argv[0]}: error: argument {flag}: ")
