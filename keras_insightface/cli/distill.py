"""``keras-insightface distill`` (``python data_distiller.py``): teacher embeddings of a dataset for distillation."""

from keras_insightface.cli.common import Parser, int_at_least, positive_float, positive_int


def build_parser(prog=None):
    parser = Parser(
        prog, description="Knowledge-distillation data: embed every training image with a teacher model and save it"
    )
    parser.add_argument(
        "-D",
        "--data_path",
        required=True,
        help="Class folder / image-list npz, or a distillation npz to convert to tfrecord",
    )
    parser.add_argument(
        "-M",
        "--model_file",
        default=None,
        help="Teacher: Keras model file (.keras/.h5), a pretrained insightface .onnx / arcface_torch .pth (imported)"
        " or another ONNX (.onnx, needs onnxruntime)",
    )
    parser.add_argument(
        "-d",
        "--dest_file",
        default=None,
        help="Output file (default <data>_shuffle_label_embs_normed_<emb>[_fp16].tfrecord|npz)",
    )
    parser.add_argument("-b", "--batch_size", type=positive_int, default=256, help="Batch size")
    parser.add_argument(
        "-L", "--limit", type=int_at_least(-1), default=-1, help="Process only the first NUM images (-1: all)"
    )
    parser.add_argument("--use_fp16", action="store_true", help="Save embeddings as float16 (half the disk space)")
    parser.add_argument("--save_npz", action="store_true", help="Save as npz instead of tfrecord")
    parser.add_argument(
        "--scale",
        type=positive_float,
        default=None,
        help="Input scale: (x - 127.5) * scale (default 0.0078125; insightface ONNX: 1/127.5)",
    )
    parser.add_argument(
        "--unsafe", action="store_true", help="Load a Keras model with safe_mode=False (only for files you trust)"
    )
    return parser


def main(argv=None, prog=None):
    args = build_parser(prog).parse_args(argv)
    from keras_insightface.tools import distiller

    model = args.model_file
    if model is not None and args.unsafe and not model.endswith(".onnx"):
        model = distiller.load_teacher(model, safe_mode=False)
    distiller.data_distiller(
        args.data_path, model, args.dest_file, args.batch_size, args.limit, args.use_fp16, args.save_npz, args.scale
    )
