#!/usr/bin/env python3
"""Speed of the evaluation metrics, printed as one JSON line.

- ``metrics_6000_pairs_s``: all verification metrics (best-threshold, 10-fold, VAL@FAR) for 6,000 pairs of 512-d
  embeddings (best of 5 runs).
- IJB-C-sized 1:1 protocol with random data: 23,124 templates of 512-d, 15,658,489 random pairs (19,557
  genuine): time of ``pair_scores`` and of the ROC / TAR@FAR step, and peak memory (``tracemalloc`` peak of
  the numpy allocations during scoring, and the process peak RSS).

Usage: ``OMP_NUM_THREADS=2 python bench/eval_speed.py [--pairs 15658489]``.
"""

import argparse
import json
import os
import resource
import sys
import time
import tracemalloc

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from keras_insightface.evaluation import evals  # noqa: E402
from keras_insightface.evaluation import ijb as IJB_evals  # noqa: E402


def time_metrics(num_pairs=6000, dim=512, repeats=5):
    rng = np.random.default_rng(0)
    issame = rng.random(num_pairs) < 0.5
    first = rng.normal(size=(num_pairs, dim)).astype(np.float32)
    second = np.where(issame[:, None], first + 1.2 * rng.normal(size=first.shape), rng.normal(size=first.shape)).astype(
        np.float32
    )
    embeddings = np.empty((2 * num_pairs, dim), np.float32)
    embeddings[0::2], embeddings[1::2] = first, second
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        evals.verification_metrics(embeddings, issame)
        best = min(best, time.perf_counter() - start)
    return best


def time_ijb_scoring(num_templates=23124, num_pairs=15658489, num_genuine=19557, dim=512):
    rng = np.random.default_rng(0)
    template_ids = np.sort(rng.choice(200000, size=num_templates, replace=False))
    feats = evals.l2_normalize(rng.normal(size=(num_templates, dim)))
    p1 = template_ids[rng.integers(0, num_templates, num_pairs)]
    p2 = template_ids[rng.integers(0, num_templates, num_pairs)]
    label = np.zeros(num_pairs, np.int64)
    label[rng.choice(num_pairs, num_genuine, replace=False)] = 1
    tracemalloc.start()
    start = time.perf_counter()
    scores = IJB_evals.pair_scores(feats, template_ids, p1, p2)
    scoring = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    start = time.perf_counter()
    IJB_evals.roc_tar_at_far(label, scores)
    roc = time.perf_counter() - start
    check = rng.integers(0, num_pairs, 1000)
    rows1, rows2 = np.searchsorted(template_ids, p1[check]), np.searchsorted(template_ids, p2[check])
    max_error = float(np.abs(scores[check] - np.sum(feats[rows1] * feats[rows2], 1)).max())
    return scoring, roc, peak, max_error


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=15658489)
    parser.add_argument("--templates", type=int, default=23124)
    args = parser.parse_args()
    metrics_s = time_metrics()
    scoring, roc, peak, max_error = time_ijb_scoring(args.templates, args.pairs)
    result = {
        "metrics_6000_pairs_s": round(metrics_s, 4),
        "ijb_templates": args.templates,
        "ijb_pairs": args.pairs,
        "ijb_pair_scoring_s": round(scoring, 2),
        "ijb_roc_tar_at_far_s": round(roc, 2),
        "ijb_scoring_numpy_peak_mb": round(peak / 2**20, 1),
        "process_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "score_max_abs_error_vs_float64": max_error,
        "cpu_count": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
