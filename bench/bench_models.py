"""Parameter counts of built-in basic models at 112x112 (no forward pass); prints one JSON line.

python bench/bench_models.py          # the figures quoted in the README (Models section)
python bench/bench_models.py --all    # every name of models.BUILDIN_MODELS with a GDC-512 head
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from keras_insightface.models import zoo as models  # noqa: E402

# (name, output_layer, emb_shape) quoted in the docs; insightface publishes r50 43.6M, r100 65.2M.
DEFAULT_CASES = (("r50", "E", 512), ("r100", "E", 512), ("mobilefacenet", "GDC", 256), ("MobileNet", "GDC", 256))


def count(name, output_layer, emb_shape):
    """Build ``name`` with the given head at 112x112 and return its total and trainable parameter counts."""
    model = models.buildin_models(name, emb_shape=emb_shape, output_layer=output_layer, input_shape=(112, 112, 3))
    trainable = sum(int(w.numpy().size) for w in model.trainable_weights)
    return {"total": model.count_params(), "trainable": trainable}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="every built-in name with a GDC-512 head")
    args = parser.parse_args(argv)
    cases = [(name, "GDC", 512) for name in models.BUILDIN_MODELS] if args.all else DEFAULT_CASES
    start = time.time()
    counts = {f"{name}_{head}_{emb}": count(name, head, emb) for name, head, emb in cases}
    print(json.dumps({"input_shape": [112, 112, 3], "params": counts, "seconds": round(time.time() - start, 1)}))


if __name__ == "__main__":
    main()
