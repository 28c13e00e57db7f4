"""``keras-insightface pretrained`` (``python pretrained.py``): import a pretrained model of another tool."""

from keras_insightface.cli.common import Parser, non_negative_int


def build_parser(prog=None):
    parser = Parser(
        prog,
        description="Import an insightface .onnx, an arcface_torch .pth / .pt or a Keras_insightface .h5 as a Keras "
        "model of this library",
    )
    parser.add_argument("source", help="pretrained model file of another tool")
    parser.add_argument("-o", "--output", default=None, help=".keras file to write (default: next to the source)")
    parser.add_argument(
        "--check", type=non_negative_int, default=0, metavar="N", help="compare with onnxruntime on N images"
    )
    return parser


def main(argv=None, prog=None):
    args = build_parser(prog).parse_args(argv)
    from keras_insightface.tools import pretrained

    dest, results = pretrained.import_pretrained(args.source, args.output, args.check)
    print(">>>> Saved:", dest)
    if results:
        print(
            f">>>> vs onnxruntime: min cosine {results['min_cosine']:.7f}, max abs diff {results['max_abs_diff']:.2e}"
        )
    return 0
