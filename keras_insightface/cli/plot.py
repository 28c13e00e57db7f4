"""``keras-insightface plot`` (``python plot.py``): training histories (``*_hist.json``) drawn into one picture."""

import os

from keras_insightface.cli.common import Parser, positive_float, positive_int


def build_parser(prog=None):
    parser = Parser(
        prog,
        description="Plot training histories: loss, accuracy, evaluations and learning rate of each run, the runs "
        "overlaid on the same axes",
    )
    parser.add_argument("histories", nargs="+", metavar="HIST_JSON", help="*_hist.json files, one run each")
    parser.add_argument("-o", "--output", help="picture to write (.png / .svg; default: <first run>.png)")
    parser.add_argument(
        "--epochs", type=positive_int, nargs="+", help="epochs of each scheduler stage: lines at the stage boundaries"
    )
    parser.add_argument("--names", nargs="+", help="stage names, written at the stage starts")
    parser.add_argument("--customs", nargs="+", default=[], help="more history keys, each in a subplot of its own")
    parser.add_argument("--limit_loss_max", type=positive_float, help="clip the loss curve at this value")
    parser.add_argument("--eval_split", action="store_true", help="each evaluation bin in a subplot of its own")
    return parser


def main(argv=None, prog=None):
    args = build_parser(prog).parse_args(argv)
    missing = [path for path in args.histories if not os.path.isfile(path)]
    if missing:
        raise FileNotFoundError(f"history not found: {', '.join(missing)}")
    from keras_insightface.evaluation import plot

    output = args.output or os.path.splitext(args.histories[0])[0] + ".png"
    axes = None
    for index, path in enumerate(args.histories):
        axes, _ = plot.hist_plot_split(
            path,
            args.epochs,
            args.names,
            args.customs,
            axes=axes,
            fig_label=os.path.basename(path).removesuffix("_hist.json"),
            save=output if index == len(args.histories) - 1 else None,
            limit_loss_max=args.limit_loss_max,
            eval_split=args.eval_split,
        )
    print(">>>> Saved:", os.path.abspath(output))
    return 0
