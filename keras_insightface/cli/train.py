"""``keras-insightface train`` (``python train.py``): train from a recipe file, or run the demo."""

import os

from keras_insightface.cli.common import Parser, positive_float, positive_int


def build_parser(prog=None):
    parser = Parser(prog, description="Train from a recipe file: --config RECIPE.py [overrides], or --demo")
    parser.add_argument("--config", help="recipe file (a path, or the name of a shipped recipe such as demo)")
    parser.add_argument("--demo", action="store_true", help="the synthetic demo run (= --config demo)")
    parser.add_argument("--data_path", help="training data: class folder, .rec, shard folder, .npz or .tfrecord")
    parser.add_argument("--save_path", help="checkpoint file of the full model (.keras or .h5)")
    parser.add_argument("--batch_size", type=positive_int, help="batch size per replica")
    parser.add_argument("--lr_base", type=positive_float, help="base learning rate")
    parser.add_argument("--mixed_precision", choices=("mixed_float16", "mixed_bfloat16"), help="mixed precision")
    parser.add_argument("--epochs_scale", type=positive_float, default=1.0, help="multiply every stage's epochs")
    parser.add_argument("--smoke", action="store_true", help="check the recipe: a few steps on demo data")
    parser.add_argument(
        "--distribute",
        choices=("mirrored", "multiworker"),
        help="mirrored: every GPU of this machine; multiworker: every machine of the cluster (TF_CONFIG, or the "
        "KERAS_DISTRIBUTION_* variables on JAX)",
    )
    return parser


def parse_arguments(argv=None, prog=None):
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if bool(args.config) == bool(args.demo):
        parser.error("give --config RECIPE or --demo")
    return args


def main(argv=None, prog=None):
    args = parse_arguments(argv, prog)
    from keras_insightface.training import recipe, train

    with train.distribution_scope(args.distribute):  # before the recipe: its optimizers belong to the strategy
        overrides = {key: getattr(args, key) for key in recipe.OVERRIDE_KEYS}
        path = recipe.shipped_recipe("demo") if args.demo else recipe.find_recipe(args.config)
        loaded = recipe.scale_epochs(recipe.load_recipe(path, overrides), args.epochs_scale)
        if args.smoke:
            smoke_dir = os.path.join("checkpoints", "smoke")
            loaded = recipe.smoke_test(loaded, os.path.join(smoke_dir, "data"), smoke_dir)
        train.run_recipe(loaded)
