"""``keras-insightface prepare`` (``python prepare_data.py``): RecordIO <-> class folders, TFRecord shards, a lost
``.idx``, verification ``.bin`` files, photos aligned into face crops, and the synthetic demo dataset."""

import os
import sys

from keras_insightface.cli.common import Parser, any_int, non_negative_int, positive_int


def _add_recordio_arguments(parser):
    parser.add_argument(
        "--to-shards",
        dest="to_shards",
        metavar="SOURCE",
        help="Copy a .rec (or its folder) or a class folder into TFRecord shards in -o DIR (no re-encoding)",
    )
    parser.add_argument(
        "--shards", type=non_negative_int, default=0, help="--to-shards: number of shards (0: ~256 MB each)"
    )
    parser.add_argument("--cache_dir", help="--to-shards: where the index of a .rec is cached")
    parser.add_argument(
        "--rebuild_idx",
        metavar="REC",
        help="Rebuild the .idx of a .rec with one sequential pass (-o IDX, else next to it)",
    )


def build_parser(prog=None):
    parser = Parser(
        prog,
        description="Dataset preparation: RecordIO <-> class folders, TFRecord shards, a lost .idx, verification .bin "
        "files, photos aligned into face crops, the synthetic demo dataset",
    )
    parser.add_argument(
        "-D", "--data_dir", help="Folder holding train.rec / train.idx to extract to <DIR>_112x112_folders"
    )
    parser.add_argument("--dest_dir", help="Extraction destination instead of <DIR>_112x112_folders")
    parser.add_argument(
        "-L", "--limit", type=non_negative_int, default=0, help="Extract only the first NUM images (0: all)"
    )
    parser.add_argument(
        "-T",
        "--test_bins",
        nargs="+",
        default=[],
        help="Old-format .bin files to re-encode into <stem>_reformatted.bin",
    )
    parser.add_argument(
        "-P", "--pack", metavar="FOLDER", help="Pack a class folder into -o DIR/train.rec, train.idx, property"
    )
    parser.add_argument(
        "-B", "--bin_from_folder", metavar="FOLDER", help="Build a verification .bin (-o OUT.bin) from a class folder"
    )
    parser.add_argument(
        "--align", metavar="RAW_DIR", help="Detect and align the faces of RAW_DIR/<class>/<photo> into -o OUT_DIR"
    )
    parser.add_argument("-o", "--output", help="Output of -P (a folder), -B (a .bin file) or --align (a folder)")
    parser.add_argument("--bin", metavar="OUT.bin", help="--align: also write a verification .bin of the crops")
    parser.add_argument(
        "--keep", default="largest", choices=("largest", "central", "all"), help="--align: faces kept per photo"
    )
    parser.add_argument(
        "--image_size", type=positive_int, nargs="+", default=[112], help="--align: crop size, SIZE or HEIGHT WIDTH"
    )
    parser.add_argument(
        "--workers",
        type=non_negative_int,
        default=0,
        help="--align: decode / save threads; --to-shards: processes (0: one per core)",
    )
    parser.add_argument(
        "--pairs",
        type=positive_int,
        default=3000,
        help="Number of pairs for -B and --bin (half genuine, half impostor)",
    )
    _add_recordio_arguments(parser)
    parser.add_argument("--demo", metavar="DIR", help="Generate the synthetic demo dataset into DIR")
    parser.add_argument("--classes", type=positive_int, default=100, help="Demo: number of training identities")
    parser.add_argument("--images", type=positive_int, default=30, help="Demo: images per identity")
    parser.add_argument("--seed", type=any_int, default=0, help="Random seed for --demo, -B and --bin")
    return parser


def parse_arguments(argv=None, prog=None):
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    actions = (args.data_dir, args.test_bins, args.pack, args.bin_from_folder, args.demo, args.align)
    if not any(actions) and not (args.to_shards or args.rebuild_idx):
        parser.error("nothing to do: give -D, -T, -P, -B, --align, --to-shards, --rebuild_idx or --demo")
    if (args.pack or args.bin_from_folder or args.align or args.to_shards) and not args.output:
        parser.error("-P, -B, --align and --to-shards need -o")
    if len(args.image_size) > 2:
        parser.error("--image_size takes SIZE or HEIGHT WIDTH")
    if args.bin and not args.align:
        parser.error("--bin goes with --align")
    return args


def _resolve_bin(path, data_dir):
    """``-T`` names are taken as given, or relative to ``-D`` as Keras_insightface's usage had it."""
    if not os.path.exists(path) and data_dir and os.path.exists(os.path.join(data_dir, path)):
        return os.path.join(data_dir, path)
    return path


def _make_demo(args):
    from keras_insightface.data import demo

    paths = demo.make_demo_dataset(args.demo, num_classes=args.classes, images_per_class=args.images, seed=args.seed)
    print(">>>> Demo:", paths)


def _extract_recordio(args, prepare_data):
    """``-D``: a RecordIO folder to class folders; status 1 when its header disagrees with its images."""
    if os.path.exists(os.path.join(args.data_dir, "train.rec")):
        summary = prepare_data.recordio_to_folders(args.data_dir, args.dest_dir, args.limit)
        print(">>>> Extracted:", summary)
        return 1 if summary["mismatch"] else 0
    if not args.test_bins:
        print(f"no train.rec in {args.data_dir}", file=sys.stderr)
        return 2
    return 0


def _convert(args):
    """``--rebuild_idx`` and ``--to-shards``: TensorFlow-free conversions of record files."""
    if args.rebuild_idx:
        from keras_insightface.data import recordio

        print(">>>> Index:", recordio.rebuild_idx(args.rebuild_idx, args.output))
    if args.to_shards:
        from keras_insightface.data import shards

        workers = args.workers or os.cpu_count()
        print(
            ">>>> Shards:", shards.write_shards(args.to_shards, args.output, args.shards, args.cache_dir, True, workers)
        )


def _align(args, prepare_data):
    if args.bin and args.keep != "all":  # one crop per photo at most: the photos bound the pairs
        prepare_data.check_pairs_of_photos(args.align, args.pairs)
    size = args.image_size * 2 if len(args.image_size) == 1 else args.image_size
    print(">>>> Aligned:", prepare_data.align_folder(args.align, args.output, size, args.keep, args.workers or None))
    if args.bin:
        print(">>>> Bin:", prepare_data.make_bin_from_folder(args.output, args.bin, args.pairs, args.seed))


def main(argv=None, prog=None):
    args = parse_arguments(argv, prog)
    from keras_insightface.tools import prepare_data

    status = 0
    if args.demo:
        _make_demo(args)
    if args.data_dir:
        status = _extract_recordio(args, prepare_data)
    for path in args.test_bins:
        print(">>>> Reformatted:", prepare_data.reformat_bin(_resolve_bin(path, args.data_dir)))
    if args.pack:
        print(">>>> Packed:", prepare_data.pack_folder(args.pack, args.output))
    if args.bin_from_folder:
        print(">>>> Bin:", prepare_data.make_bin_from_folder(args.bin_from_folder, args.output, args.pairs, args.seed))
    _convert(args)
    if args.align:
        _align(args, prepare_data)
    return status
