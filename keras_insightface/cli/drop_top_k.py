"""``keras-insightface drop-top-k`` (``python data_drop_top_k.py``): sub-center ArcFace data cleaning."""

from keras_insightface.cli.common import Parser, int_in, non_negative_int, positive_int


def build_parser(prog=None):
    parser = Parser(
        prog, description="Sub-center ArcFace dataset cleaning: drop images far from their class's dominant sub-center"
    )
    parser.add_argument(
        "-M", "--model_file", required=True, help="Saved training model file (with the NormDense head), NOT basic_model"
    )
    parser.add_argument(
        "-D", "--data_path", required=True, help="Original dataset path (class folder or image-list npz)"
    )
    parser.add_argument("-d", "--dest_file", default=None, help="Dest file path to save the processed dataset npz")
    parser.add_argument("-t", "--deg_thresh", type=int_in(0, 180), default=75, help="Thresh value in degree, [0, 180]")
    parser.add_argument(
        "-L", "--limit", type=non_negative_int, default=0, help="Process only the first NUM classes (0: all)"
    )
    parser.add_argument("-b", "--batch_size", type=positive_int, default=128, help="Batch size for embedding")
    return parser


def main(argv=None, prog=None):
    args = build_parser(prog).parse_args(argv)
    from keras_insightface.tools import drop_top_k

    dest = drop_top_k.data_drop_top_k(
        args.model_file, args.data_path, args.dest_file, args.deg_thresh, args.limit, args.batch_size
    )
    print(">>>> Output:", dest)
