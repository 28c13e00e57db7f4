"""``keras-insightface export`` (``python export.py``): a basic model to TFLite / SavedModel / ONNX."""

from keras_insightface.cli.common import Parser, positive_int

FORMATS = ("tflite", "saved_model", "onnx")  # the library's too (export.FORMATS)
QUANTIZATIONS = ("float16", "dynamic", "int8", "uint8")  # the library's too (export.QUANTIZATIONS)


def build_parser(prog=None):
    parser = Parser(prog, description="Export a basic model to TFLite / SavedModel / ONNX for deployment")
    parser.add_argument(
        "-m", "--model", required=True, help="basic model file (.keras / .h5, or a pretrained .onnx / .pth imported)"
    )
    parser.add_argument("-f", "--format", default="tflite", choices=FORMATS, help="output format")
    parser.add_argument("-q", "--quant", default=None, choices=QUANTIZATIONS, help="TFLite quantization")
    parser.add_argument("-r", "--representative_data", default=None, help="folder or .bin for int8/uint8")
    parser.add_argument(
        "-n", "--num_calibration", type=positive_int, default=100, help="calibration images for int8/uint8"
    )
    parser.add_argument("--preprocess", action="store_true", help="uint8 RGB input, normalization built in")
    parser.add_argument("--l2", action="store_true", help="L2-normalize the output embedding")
    parser.add_argument("--dynamic", action="store_true", help="accept any HxW input, resized to the model size")
    parser.add_argument("-o", "--output", default=None, help="output path, default next to the model")
    parser.add_argument("--unsafe", action="store_true", help="load the model with safe_mode=False (trusted files)")
    return parser


def main(argv=None, prog=None):
    args = build_parser(prog).parse_args(argv)
    from keras_insightface.tools import export

    dest = export.export_model(
        args.model,
        dest=args.output,
        format=args.format,
        quant=args.quant,
        representative_data=args.representative_data,
        include_preprocessing=args.preprocess,
        l2_normalize=args.l2,
        dynamic_input_size=args.dynamic,
        num_calibration=args.num_calibration,
        safe_mode=not args.unsafe,
    )
    print(f">>>> exported {args.format}{'/' + args.quant if args.quant else ''}: {dest}")
    return dest
