"""``keras-insightface evals`` (``python evals.py``): a basic model on verification ``.bin`` files (``-t``), on a
folder of aligned faces (``--folder``), or comparing the faces of photos (``--compare``)."""

import itertools
import os

from keras_insightface.cli.common import Parser, any_int, positive_int

RESULT_DIR = "eval_result"  # the library's default too (photo_evals.RESULT_DIR)
MAX_PAIRS = 1_000_000  # the library's default too (photo_evals.MAX_PAIRS)


def build_parser(prog=None):
    parser = Parser(
        prog,
        description="Evaluate a basic model: verification .bin files (-t), a folder of aligned faces (--folder), "
        "or compare the faces of photos (--compare)",
    )
    parser.add_argument(
        "-m",
        "--model",
        required=True,
        help="saved basic model (.keras / .h5), a training checkpoint (its embedding model is evaluated), or a "
        "pretrained insightface .onnx, arcface_torch .pth / .pt or Keras_insightface .h5 (imported); other .onnx "
        "files: --folder, --compare",
    )
    parser.add_argument("-t", "--test_bin_files", nargs="+", default=[], help="verification .bin files")
    parser.add_argument("--folder", help="class folder of aligned faces: 1:1 verification and 1:N identification")
    parser.add_argument("--compare", nargs="+", metavar="PHOTO", help="photos whose faces are compared with each other")
    parser.add_argument("-b", "--batch_size", type=positive_int, default=128, help="evaluation batch size")
    parser.add_argument(
        "--no-flip", dest="flip", action="store_false", help="disable the flip test-time augmentation (on by default)"
    )
    parser.add_argument(
        "--scale", type=float, default=128.0, choices=(128.0, 127.5), help="input normalization (x - 127.5) / scale"
    )
    parser.add_argument(
        "--unsafe_load", action="store_true", help="load the model with safe_mode=False (trusted files only)"
    )
    parser.add_argument(
        "--gallery_size", type=positive_int, default=1, help="--folder: gallery images per identity for 1:N"
    )
    parser.add_argument(
        "--max_pairs", type=positive_int, default=MAX_PAIRS, help="--folder: most genuine / impostor pairs"
    )
    parser.add_argument("--seed", type=any_int, default=0, help="--folder: seed of pair sampling and gallery choice")
    parser.add_argument(
        "--threshold",
        help="--compare: same-person threshold, a number, a *_folder.json or a *_hist.json[:BIN]; "
        "without it, the model's newest folder evaluation or else its training history",
    )
    parser.add_argument(
        "--keep", default="largest", choices=("largest", "central"), help="--compare: face of a photo with several"
    )
    parser.add_argument("--result_dir", default=RESULT_DIR, help="--folder and --compare: output folder")
    return parser


def parse_arguments(argv=None, prog=None):
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if not (args.test_bin_files or args.folder or args.compare):
        parser.error("nothing to evaluate: give -t BIN, --folder DIR or --compare PHOTO PHOTO")
    if args.compare is not None and len(args.compare) < 2:
        parser.error("--compare needs at least 2 photos")
    return args


def _resolve_threshold(args):
    """``(threshold, where it comes from)``: ``--threshold`` as a number or read from a file, or found next to the
    model (``(None, None)`` when nowhere)."""
    from keras_insightface.evaluation import photo_evals

    if args.threshold is None:
        return photo_evals.find_model_threshold(args.model, args.result_dir)
    try:
        return float(args.threshold), "--threshold"
    except ValueError:
        return photo_evals.threshold_from_file(args.threshold), f"--threshold {args.threshold}"


def _compare_picture_path(result_dir, photos, name):
    """``compare_<model>_<photo>_<photo>[_and_<N>_more][_<K>].png``: the first name no earlier comparison took."""
    stems = [os.path.splitext(os.path.basename(photo))[0] for photo in photos]
    more = f"_and_{len(stems) - 2}_more" if len(stems) > 2 else ""
    base = os.path.join(result_dir, f"compare_{name}_{stems[0]}_{stems[1]}{more}")
    taken = lambda number: os.path.exists(f"{base}_{number}.png" if number > 1 else base + ".png")  # noqa: E731
    number = next(number for number in itertools.count(1) if not taken(number))
    return f"{base}_{number}.png" if number > 1 else base + ".png"


def _check_inputs(args):
    """Missing folders and photos are reported before the model is loaded."""
    if args.folder and not os.path.isdir(args.folder):
        raise FileNotFoundError(f"folder of aligned faces not found: {args.folder}")
    missing = [photo for photo in args.compare or () if not os.path.isfile(photo)]
    if missing:
        raise FileNotFoundError(f"photo not found: {', '.join(missing)}")


def _load_model(args):
    """The model to evaluate: an ONNX file run by onnxruntime as it is, else a Keras model (imported when it is a
    pretrained model of another tool)."""
    from keras_insightface.evaluation import evals
    from keras_insightface.models import onnx_graph

    is_onnx = args.model.endswith(".onnx") and not onnx_graph.is_insightface_graph(args.model)
    if is_onnx and args.test_bin_files:
        raise ValueError("-t needs a Keras model (.keras / .h5); an .onnx model works with --folder and --compare")
    return args.model if is_onnx else evals.load_basic_model(args.model, safe_mode=not args.unsafe_load)


def main(argv=None, prog=None):
    args = parse_arguments(argv, prog)
    _check_inputs(args)
    from keras_insightface.evaluation import evals, photo_evals

    scale, results = 1.0 / args.scale, {}
    model = _load_model(args)
    if args.test_bin_files:
        results["bins"] = evals.evaluate_bins(model, args.test_bin_files, args.batch_size, args.flip, scale)
        print(evals.format_results_table(results["bins"]))
    name = photo_evals.model_name(args.model)
    if args.folder:
        results["folder"] = photo_evals.evaluate_folder(
            model,
            args.folder,
            batch_size=args.batch_size,
            flip=args.flip,
            image_scale=scale,
            max_pairs=args.max_pairs,
            gallery_per_identity=args.gallery_size,
            seed=args.seed,
            result_dir=args.result_dir,
            name=name,
        )
    if args.compare:
        picture = _compare_picture_path(args.result_dir, args.compare, name)
        threshold, source = _resolve_threshold(args)
        results["compare"] = photo_evals.compare_photos(
            model, args.compare, threshold, None, args.keep, args.flip, scale, picture, threshold_source=source
        )
        print(photo_evals.format_comparison(results["compare"]))
        print(">>>> Saved:", os.path.abspath(picture))
    return results["bins"] if list(results) == ["bins"] else results  # -t alone keeps its earlier result shape
