"""Parameter counts of built-in basic models at 112x112; prints one JSON line.

python bench/bench_models.py          # the figures quoted in the README (Models section)
python bench/bench_models.py --all    # every name of models.BUILDIN_MODELS with a GDC-512 head (ViTs: their own)
python bench/bench_models.py --vit    # each ViT size: parameters, multiply-adds, Keras inference images/s
"""

import argparse
import json
import os
import sys
import time

import keras
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from keras_insightface.models import zoo as models  # noqa: E402
from keras_insightface.models.backbones import vit  # noqa: E402

# (name, output_layer, emb_shape) quoted in the docs; insightface publishes r50 43.6M, r100 65.2M.
DEFAULT_CASES = (("r50", "E", 512), ("r100", "E", 512), ("mobilefacenet", "GDC", 256), ("MobileNet", "GDC", 256))


VIT_SIZES = ("vit_t", "vit_s", "vit_b", "vit_l_dp005_mask_005")  # the other names share these layouts


def count(name, output_layer, emb_shape):
    """Build ``name`` with the given head at 112x112 and return its total and trainable parameter counts."""
    model = models.buildin_models(name, emb_shape=emb_shape, output_layer=output_layer, input_shape=(112, 112, 3))
    trainable = sum(int(w.numpy().size) for w in model.trainable_weights)
    return {"total": model.count_params(), "trainable": trainable}


def multiply_adds(model):
    """Multiply-adds of one image through the convolutions, dense layers and attention products (what arcface_torch's
    GFLOPs figures count: its table's ViT-T 1.5, ViT-B 11.4, ViT-L 25.3); normalizations and adds left out."""
    tokens, total = model.get_layer("pos_embed").output.shape[1], 0  # (a masking ViT's blocks see None tokens)
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            total += int(np.prod(layer.output.shape[1:3])) * int(np.prod(layer.kernel.shape))
        elif isinstance(layer, keras.layers.Dense):
            total += (tokens if len(layer.input.shape) == 3 else 1) * int(np.prod(layer.kernel.shape))
        elif isinstance(layer, vit.SelfAttention):  # q k^T and the weighted sum of v, over every token pair
            total += 2 * tokens * tokens * layer.output.shape[-1]
    return total


def vit_row(name, batch=16, repeats=3):
    """Parameters, multiply-adds and Keras inference images/s (``predict_on_batch`` of ``batch`` images, median of
    ``repeats`` after one warm-up call) of the ViT ``name`` with its own head."""
    model = models.buildin_models(name, input_shape=(112, 112, 3))
    images = np.random.default_rng(0).uniform(-1, 1, (batch, 112, 112, 3)).astype("float32")
    model.predict_on_batch(images)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.predict_on_batch(images)
        times.append(time.perf_counter() - start)
    trainable = sum(int(w.numpy().size) for w in model.trainable_weights)
    return {
        "total": model.count_params(),
        "trainable": trainable,
        "gmacs": round(multiply_adds(model) / 1e9, 3),
        "inference_images_per_s": round(batch / float(np.median(times)), 2),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="every built-in name with a GDC-512 head")
    parser.add_argument("--vit", action="store_true", help="each ViT size: parameters, multiply-adds, images/s")
    args = parser.parse_args(argv)
    start, load = time.time(), os.getloadavg()
    if args.vit:
        rows = {name: vit_row(name) for name in VIT_SIZES}
        print(
            json.dumps(
                {"vit": rows, "load_average": [round(v, 2) for v in load], "seconds": round(time.time() - start, 1)}
            )
        )
        return
    heads = {name: models.head_settings(name)[0] for name in models.BUILDIN_MODELS}  # GDC, a ViT's own head
    cases = [(name, "GDC" if heads[name] == "GDC" else None, 512) for name in models.BUILDIN_MODELS]
    cases = cases if args.all else DEFAULT_CASES
    counts = {f"{name}_{head or heads[name]}_{emb}": count(name, head, emb) for name, head, emb in cases}
    print(json.dumps({"input_shape": [112, 112, 3], "params": counts, "seconds": round(time.time() - start, 1)}))


if __name__ == "__main__":
    main()
