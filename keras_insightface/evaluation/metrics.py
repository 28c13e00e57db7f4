"""Face-verification and identification metrics, pure numpy (no TensorFlow).

- Verification on pairs (``.bin`` files, folders): the best-threshold cosine accuracy, insightface's 10-fold
  accuracy on squared L2 distances and VAL@FAR=1e-3, re-implemented exactly and vectorized (sort once, count
  with ``searchsorted``); for a folder's unbalanced pairs, the best threshold on balanced accuracy.
- ROC on scores: ``roc_curve`` (as scikit-learn's), TAR at given FARs and AUC.
- Open-set 1:N identification: top-k accuracy and TPIR at FPIR.
"""

import numpy as np

KFOLD_THRESHOLDS = np.arange(0, 4, 0.01)  # insightface calculate_roc thresholds on squared L2 distance
VAL_THRESHOLDS = np.arange(0, 4, 0.001)  # insightface calculate_val thresholds
VAL_FAR_TARGET = 1e-3
FAR_TARGETS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
FPIR_TARGETS = (0.01, 0.1)
TOP_K = (1, 5, 10)


# ---------------------------------------------------------------------------------------------------------
# Verification on pairs.
# ---------------------------------------------------------------------------------------------------------
def l2_normalize(embeddings, axis=-1):
    """L2-normalize rows (zero rows stay zero)."""
    embeddings = np.asarray(embeddings)
    norm = np.linalg.norm(embeddings, axis=axis, keepdims=True)
    return embeddings / np.where(norm == 0, 1, norm)


def _check_pairs(embeddings, issame):
    embeddings = np.asarray(embeddings)
    issame = np.asarray(issame, dtype=bool).reshape(-1)
    if embeddings.ndim != 2 or embeddings.shape[0] != 2 * issame.shape[0]:
        raise ValueError(
            f"expected 2 * {issame.shape[0]} embeddings for {issame.shape[0]} pairs, got shape {embeddings.shape}"
        )
    return embeddings, issame


def best_threshold_accuracy(scores, issame):
    """Keras_insightface's accuracy: max over candidate thresholds of (#genuine > t + #impostor <= t) / N.

    Candidates are the top 10% impostor scores (``int(0.1 * n_impostor)`` of them, at least one); ties go to
    the smallest candidate, as ``np.argmax`` in the reference. Returns ``(accuracy, threshold)``.
    """
    scores = np.asarray(scores).reshape(-1)
    issame = np.asarray(issame, dtype=bool).reshape(-1)
    if scores.shape != issame.shape:
        raise ValueError(f"{scores.shape[0]} scores for {issame.shape[0]} labels")
    genuine = np.sort(scores[issame])
    impostor = np.sort(scores[~issame])
    if impostor.size == 0:
        raise ValueError("best-threshold accuracy needs at least one impostor pair")
    num_steps = max(int(0.1 * impostor.shape[0]), 1)
    candidates = impostor[-num_steps:]
    correct = genuine.shape[0] - np.searchsorted(genuine, candidates, side="right")
    correct = correct + np.searchsorted(impostor, candidates, side="right")
    best = int(np.argmax(correct))
    return correct[best] / scores.shape[0], candidates[best]


def balanced_best_threshold(scores, issame):
    """Best threshold when genuine and impostor pairs weigh the same: max over t of (TPR(t) + TNR(t)) / 2.

    A pair is called genuine when its score is > t. Meant for pair sets with far more impostors than genuine
    pairs (all pairs of a folder), where plain accuracy would reward calling everything "different". Every
    distinct score is a candidate; ties go to the smallest. Returns ``(balanced accuracy, threshold)``.
    """
    scores = np.asarray(scores).reshape(-1)
    issame = np.asarray(issame, dtype=bool).reshape(-1)
    if scores.shape != issame.shape:
        raise ValueError(f"{scores.shape[0]} scores for {issame.shape[0]} labels")
    genuine, impostor = np.sort(scores[issame]), np.sort(scores[~issame])
    if genuine.size == 0 or impostor.size == 0:
        raise ValueError("a balanced accuracy needs both genuine and impostor pairs")
    candidates = np.unique(scores)
    tpr = (genuine.size - np.searchsorted(genuine, candidates, side="right")) / genuine.size
    tnr = np.searchsorted(impostor, candidates, side="right") / impostor.size
    best = int(np.argmax(tpr + tnr))
    return float((tpr[best] + tnr[best]) / 2), float(candidates[best])


def squared_l2_distances(embeddings):
    """Squared L2 distance of consecutive pairs ``e[0::2], e[1::2]``, computed as the reference does."""
    return np.sum(np.square(np.subtract(embeddings[0::2], embeddings[1::2])), 1)


def _kfold_slices(num_pairs, num_folds=10):
    """Contiguous test folds of ``sklearn.model_selection.KFold(num_folds, shuffle=False)``."""
    sizes = np.full(num_folds, num_pairs // num_folds, dtype=np.int64)
    sizes[: num_pairs % num_folds] += 1
    ends = np.cumsum(sizes)
    return [slice(int(end - size), int(end)) for end, size in zip(ends, sizes)]


def _count_less(sorted_values, thresholds):
    """Number of values strictly below each threshold (the reference predicts same-person by ``dist < t``)."""
    return np.searchsorted(sorted_values, thresholds, side="left")


def _fold_counts(dist, issame, folds, thresholds):
    """Per fold: (genuine < t, impostor < t, #genuine, #impostor) for the test fold and the train split."""
    all_gen = _count_less(np.sort(dist[issame]), thresholds)
    all_imp = _count_less(np.sort(dist[~issame]), thresholds)
    num_gen, num_imp = int(issame.sum()), int((~issame).sum())
    for fold in folds:
        fold_dist, fold_same = dist[fold], issame[fold]
        test_gen = _count_less(np.sort(fold_dist[fold_same]), thresholds)
        test_imp = _count_less(np.sort(fold_dist[~fold_same]), thresholds)
        test_num_gen = int(fold_same.sum())
        test_num_imp = fold_same.shape[0] - test_num_gen
        test = (test_gen, test_imp, test_num_gen, test_num_imp)
        train = (all_gen - test_gen, all_imp - test_imp, num_gen - test_num_gen, num_imp - test_num_imp)
        yield test, train


def kfold_accuracy(dist, issame, num_folds=10, thresholds=KFOLD_THRESHOLDS):
    """insightface ``calculate_roc`` accuracy: per fold the first threshold maximizing train accuracy.

    ``dist`` are squared L2 distances. Returns the array of per-fold test accuracies.
    """
    dist = np.asarray(dist).reshape(-1)
    issame = np.asarray(issame, dtype=bool).reshape(-1)
    folds = _kfold_slices(dist.shape[0], num_folds)
    accuracy = np.zeros(num_folds)
    for fold_idx, (test, train) in enumerate(_fold_counts(dist, issame, folds, thresholds)):
        train_correct = train[0] + (train[3] - train[1])  # tp + tn
        best = int(np.argmax(train_correct))
        test_size = test[2] + test[3]
        accuracy[fold_idx] = float(test[0][best] + test[3] - test[1][best]) / test_size
    return accuracy


def _interpolate_threshold(far, thresholds, far_target):
    """Threshold where the FAR curve crosses ``far_target``: what scipy's pre-1.9.3 slinear interp1d did."""
    if np.max(far) < far_target:
        return 0.0
    j = int(np.searchsorted(far, far_target, side="right")) - 1
    if j + 1 >= far.shape[0]:
        return float(thresholds[j])
    return thresholds[j] + (far_target - far[j]) * (thresholds[j + 1] - thresholds[j]) / (far[j + 1] - far[j])


def _safe_ratio(count, total):
    return float(count) / float(total) if total else 0.0


def kfold_val_far(dist, issame, far_target=VAL_FAR_TARGET, num_folds=10, thresholds=VAL_THRESHOLDS):
    """insightface ``calculate_val``: returns ``(val_mean, val_std, far_mean)`` on squared L2 distances."""
    dist = np.asarray(dist).reshape(-1)
    issame = np.asarray(issame, dtype=bool).reshape(-1)
    folds = _kfold_slices(dist.shape[0], num_folds)
    val, far = np.zeros(num_folds), np.zeros(num_folds)
    for fold_idx, (_, train) in enumerate(_fold_counts(dist, issame, folds, thresholds)):
        far_train = train[1] / float(train[3]) if train[3] else np.zeros(thresholds.shape[0])
        threshold = _interpolate_threshold(far_train, thresholds, far_target)
        fold_dist, fold_same = dist[folds[fold_idx]], issame[folds[fold_idx]]
        predict = fold_dist < threshold
        val[fold_idx] = _safe_ratio(np.sum(predict & fold_same), np.sum(fold_same))
        far[fold_idx] = _safe_ratio(np.sum(predict & ~fold_same), np.sum(~fold_same))
    return np.mean(val), np.std(val), np.mean(far)


def verification_metrics(embeddings, issame, num_folds=10):
    """All verification metrics for 2N embeddings (pairs consecutive) and N labels, as a dict.

    Embeddings are L2-normalized first. Keys: ``accuracy``, ``thresh`` (best-threshold cosine accuracy),
    ``10fold``, ``10fold_std`` (insightface), ``val``, ``val_std``, ``far`` (VAL@FAR=1e-3).
    """
    embeddings, issame = _check_pairs(embeddings, issame)
    if issame.shape[0] < num_folds:
        raise ValueError(f"{issame.shape[0]} pairs are too few for {num_folds}-fold verification metrics")
    embeddings = l2_normalize(embeddings)
    scores = np.einsum("ij,ij->i", embeddings[0::2], embeddings[1::2])
    accuracy, thresh = best_threshold_accuracy(scores, issame)
    dist = squared_l2_distances(embeddings)
    fold_acc = kfold_accuracy(dist, issame, num_folds)
    val, val_std, far = kfold_val_far(dist, issame, num_folds=num_folds)
    return {
        "accuracy": float(accuracy),
        "thresh": float(thresh),
        "10fold": float(np.mean(fold_acc)),
        "10fold_std": float(np.std(fold_acc)),
        "val": float(val),
        "val_std": float(val_std),
        "far": float(far),
    }


# ---------------------------------------------------------------------------------------------------------
# ROC and 1:N identification.
# ---------------------------------------------------------------------------------------------------------
def roc_curve(label, scores):
    """``sklearn.metrics.roc_curve(label, scores)``'s ``(fpr, tpr)`` (``drop_intermediate=True``), computed faster.

    One ascending sort of all scores gives the distinct thresholds and how many scores reach each; the genuine
    count comes from the few genuine scores sorted separately. As sklearn, points where the (FP, TP) step into
    them equals the step out of them are dropped and (0, 0) is prepended.
    """
    scores = np.asarray(scores).reshape(-1)
    label = np.asarray(label).reshape(-1).astype(bool)
    if scores.shape != label.shape:
        raise ValueError(f"{scores.shape[0]} scores for {label.shape[0]} labels")
    if label.all() or not label.any():
        raise ValueError("a ROC needs both genuine and impostor pairs")
    ascending = np.sort(scores)
    starts = np.flatnonzero(np.r_[True, ascending[1:] != ascending[:-1]])[::-1]  # distinct values, descending
    values = ascending[starts]
    tps = label.sum() - np.searchsorted(np.sort(scores[label]), values, side="left")
    fps = (scores.shape[0] - starts) - tps
    if fps.shape[0] > 2:
        keep = np.r_[True, (np.diff(fps, 2) != 0) | (np.diff(tps, 2) != 0), True]
        fps, tps = fps[keep], tps[keep]
    fps, tps = np.r_[0, fps], np.r_[0, tps]
    return fps / fps[-1], tps / tps[-1]


def roc_tar_at_far(label, scores, far_targets=FAR_TARGETS):
    """ROC (as ``sklearn.metrics.roc_curve``), TAR at each FAR (nearest FPR, ties to the larger TPR) and AUC."""
    from sklearn.metrics import auc

    fpr, tpr = roc_curve(label, scores)
    roc_auc = float(auc(fpr, tpr))
    flipped_fpr, flipped_tpr = fpr[::-1], tpr[::-1]  # argmin takes the first: the larger TPR among equals
    tars = [float(flipped_tpr[np.argmin(np.abs(flipped_fpr - far))]) for far in far_targets]
    return tars, roc_auc, fpr, tpr


def evaluation_1N(probe_feats, gallery_feats, probe_ids, gallery_ids, fpir_targets=FPIR_TARGETS, top_k=TOP_K):  # noqa: N802
    """Open-set identification: top-k accuracy of mated probes and TPIR at FPIR from non-mated probes.

    Gallery subjects have one template each. A mated probe is ranked by the number of non-mated gallery
    templates scoring strictly higher than its mate. The threshold at FPIR f is the ``max(int(n * f) - 1, 0)``-th
    largest top score of the n non-mated probes; TPIR counts mated probes ranked first and above it. A metric that
    has no probe to measure (top-k without mated probes, TPIR without non-mated ones) is None, not 0.
    """
    probe_ids, gallery_ids = np.asarray(probe_ids), np.asarray(gallery_ids)
    if np.unique(gallery_ids).shape[0] != gallery_ids.shape[0]:
        raise ValueError("1:N gallery must hold one template per subject")
    similarity = np.asarray(probe_feats, np.float64) @ np.asarray(gallery_feats, np.float64).T
    order = np.argsort(gallery_ids)
    position = np.searchsorted(gallery_ids[order], probe_ids)
    position = np.minimum(position, gallery_ids.shape[0] - 1)
    mated = gallery_ids[order][position] == probe_ids
    mate_column = order[position[mated]]
    mated_sim = similarity[mated]
    mate_score = mated_sim[np.arange(mate_column.shape[0]), mate_column]
    non_mate = mated_sim.copy()
    non_mate[np.arange(mate_column.shape[0]), mate_column] = -np.inf
    rank = np.sum(non_mate > mate_score[:, None], axis=1)
    result = {
        "num_gallery": int(gallery_ids.shape[0]),
        "num_mated": int(mated.sum()),
        "num_non_mated": int((~mated).sum()),
    }
    for kk in top_k:
        result[f"top{kk}"] = float(np.mean(rank < kk)) if mated.any() else None
    non_mated_max = np.sort(similarity[~mated].max(axis=1))[::-1]
    for fpir in fpir_targets:
        value = None
        if mated.any() and non_mated_max.shape[0]:
            thresh = non_mated_max[max(int(non_mated_max.shape[0] * fpir) - 1, 0)]
            value = float(np.mean((rank == 0) & (mate_score > thresh)))
        result[f"tpir@fpir={fpir:g}"] = value
    return result


def mean_over_galleries(results):
    """The mean of each 1:N metric over galleries' ``evaluation_1N`` results, over those that have it (None where
    none has: e.g. top-1 of galleries without a mated probe); the probe and gallery counts are summed."""
    first = next(iter(results))
    mean = {}
    for key in first:
        values = [result[key] for result in results if result[key] is not None]
        if key.startswith("num_"):
            mean[key] = int(sum(values))
        else:
            mean[key] = float(np.mean(values)) if values else None
    return mean


IDENTIFICATION_COUNTS = {"num_gallery": "gallery", "num_mated": "mated probes", "num_non_mated": "non-mated probes"}


def identification_table(results):
    """A Markdown table of 1:N results (``{row name: evaluation_1N dict}``): the gallery and probe counts, then each
    metric; a metric without probes to measure it is n/a."""
    keys = [key for key in next(iter(results.values())) if key not in IDENTIFICATION_COUNTS]
    header = ["gallery", *IDENTIFICATION_COUNTS.values(), *keys]
    lines = ["| " + " | ".join(header) + " |", "| --- " * len(header) + "|"]
    for name, values in results.items():
        counts = [str(values.get(key, "")) for key in IDENTIFICATION_COUNTS]
        cells = ["n/a" if values[key] is None else f"{values[key]:.6f}" for key in keys]
        lines.append(f"| {name} | " + " | ".join(counts + cells) + " |")
    return "\n".join(lines)
