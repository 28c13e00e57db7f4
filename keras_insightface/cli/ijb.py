"""``keras-insightface ijb`` (``python IJB_evals.py``): IJB-B / IJB-C 1:1 verification and 1:N identification."""

from keras_insightface.cli.common import Parser, positive_int

DEFAULT_SCENARIO = "N0D1F1"  # the library's default too (ijb.DEFAULT_SCENARIO)
RESULT_DIR = "IJB_result"  # the library's default too (ijb.RESULT_DIR)


def build_parser(prog=None):
    parser = Parser(prog, description="IJB-B / IJB-C evaluation")
    parser.add_argument(
        "-m",
        "--model_file",
        default=None,
        help="model: .keras / .h5, a pretrained insightface .onnx / arcface_torch .pth (imported), or another .onnx"
        " with onnxruntime installed",
    )
    parser.add_argument("-d", "--data_path", default="./", help="folder holding the IJBB / IJBC sub folders")
    parser.add_argument(
        "-s", "--subset", default="IJBB", type=str.upper, choices=("IJBB", "IJBC"), help="subset to test"
    )
    parser.add_argument("-b", "--batch_size", type=positive_int, default=128, help="batch size for the embeddings")
    parser.add_argument(
        "-R", "--restore_embs", default=None, help="embeddings npz saved by -E, used instead of a model"
    )
    parser.add_argument(
        "-L", "--save_label", action="store_true", help="save the pair labels with the scores (for --plot_only)"
    )
    parser.add_argument(
        "-E", "--save_embeddings", action="store_true", help="save the image embeddings to the result folder"
    )
    parser.add_argument("-B", "--is_bunch", action="store_true", help="run all 8 scenarios N{0,1}D{0,1}F{0,1}")
    parser.add_argument(
        "-N", "--is_one_2_N", action="store_true", help="run the 1:N identification test instead of 1:1"
    )
    parser.add_argument("-F", "--force_reload", action="store_true", help="recompute embeddings even if -E saved them")
    parser.add_argument(
        "--scenario", default=DEFAULT_SCENARIO, help="N(orm) D(etector score) F(lip) flags, e.g. N1D1F0"
    )
    parser.add_argument("--scale", type=float, default=128.0, choices=(128.0, 127.5), help="input (x - 127.5) / scale")
    parser.add_argument("--result_dir", default=RESULT_DIR, help="output folder")
    parser.add_argument(
        "--unsafe_load", action="store_true", help="load the Keras model with safe_mode=False (trusted only)"
    )
    parser.add_argument(
        "--plot_only", nargs="+", default=None, help="score .npy / .npz files [+ label txt / npy]: table and plot only"
    )
    return parser


def parse_arguments(argv=None, prog=None):
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.plot_only is None and not (args.model_file or args.restore_embs):
        parser.error("give a model (-m), saved embeddings (-R) or --plot_only")
    return args


def main(argv=None, prog=None):
    args = parse_arguments(argv, prog)
    from keras_insightface.evaluation import ijb

    ijb.parse_scenario(args.scenario)  # a malformed scenario is refused before any work
    if args.plot_only:
        return ijb.plot_only(args.plot_only, args.result_dir)
    return ijb.run_evaluation(args)
