"""AUROC for the statistics of the table (workflow_scripts.study.stats): of every score column at once, on
bootstrap resamples of patients (one sparse product for all resamples), and with each patient left
out in turn (in closed form, for the degrees of freedom of the patient-level variance)."""

from __future__ import annotations

import numpy as np
from scipy import sparse
from scipy.stats import rankdata


def auroc_columns(targets: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """AUROC of every column at once (Mann-Whitney with average ranks); NaN where a column lacks a class."""
    positives = targets.sum(axis=0)
    negatives = targets.shape[0] - positives
    rank_sum = (rankdata(scores, axis=0) * targets).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)
    return np.where((positives > 0) & (negatives > 0), auc, np.nan)


def column_entries(target: np.ndarray, score: np.ndarray, patient: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """One score column as the entries of a sparse matrix that maps patient bootstrap counts to the
    figures its AUROC needs, so every resample costs one sparse product instead of a sort.

    Sorted by score, the tie groups that hold a positive (K of them) cut the negatives into
    segments. For each of those groups k the rows hold, per patient, the number of negative films
    in the segment just below k, the negatives tied with k and the positives in k; a last row
    counts every negative. With counts c (patients) the weighted AUROC is
    sum_k pos_k * (cumsum_k(segment) + tie_k / 2) / (sum_k pos_k * negatives).
    Returns (rows, patient columns, K); the matrix has 3 K + 1 rows."""
    _, group = np.unique(score, return_inverse=True)  # tie groups, in score order
    positive = target > 0
    pos_groups = np.unique(group[positive])
    k = len(pos_groups)
    neg_group = group[~positive]
    above = np.searchsorted(pos_groups, neg_group, side="right")  # first positive group above the negative
    tied = np.searchsorted(pos_groups, neg_group, side="left")
    is_tied = (tied < k) & (pos_groups[np.minimum(tied, k - 1)] == neg_group) if k else np.zeros(len(neg_group), bool)
    keep = above < k
    rows = np.concatenate([above[keep], k + tied[is_tied], 2 * k + np.searchsorted(pos_groups, group[positive]),
                           np.full(len(neg_group), 3 * k)])
    cols = np.concatenate([patient[~positive][keep], patient[~positive][is_tied], patient[positive], patient[~positive]])
    return rows, cols, k


def weighted_auroc_columns(targets: np.ndarray, scores: np.ndarray, clusters: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """AUROC of every column when cluster j of `clusters` (codes 0..P-1) is counted counts[b, j]
    times -> (resamples, columns). All columns go through one block sparse product."""
    counts_t = np.ascontiguousarray(counts.T)  # (patients, resamples): the layout the sparse product reads fastest
    entries = [column_entries(targets[:, j], scores[:, j], clusters) for j in range(targets.shape[1])]
    offsets = np.cumsum([0] + [3 * k + 1 for _, _, k in entries])
    rows = np.concatenate([r + offset for (r, _, _), offset in zip(entries, offsets)])
    cols = np.concatenate([c for _, c, _ in entries])
    sums = sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(offsets[-1], counts.shape[1])) @ counts_t
    out = np.full((counts.shape[0], len(entries)), np.nan)
    for j, ((_, _, k), offset) in enumerate(zip(entries, offsets)):
        if k == 0:
            continue
        block = sums[offset:offset + 3 * k + 1]
        below = np.cumsum(block[:k], axis=0)
        positives = block[2 * k:3 * k]
        pairs = positives.sum(axis=0) * block[3 * k]
        with np.errstate(invalid="ignore", divide="ignore"):
            out[:, j] = np.where(pairs > 0, (positives * (below + 0.5 * block[k:2 * k])).sum(axis=0) / pairs, np.nan)
    return out


def cluster_counts(clusters: np.ndarray, n_boot: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Each image's cluster code (0..P-1) and the bootstrap counts (n_boot x P): the P clusters
    drawn with replacement; every image of a drawn cluster comes along as often as its cluster."""
    codes, index = np.unique(clusters, return_inverse=True)
    return index, rng.multinomial(len(codes), np.full(len(codes), 1 / len(codes)), size=n_boot).astype(float)


def within_cluster_pairs(clusters: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every ordered pair of images (i, j) of one cluster, i == j included, as two index arrays."""
    order = np.argsort(clusters, kind="stable")
    sizes = np.bincount(clusters)
    per = sizes[clusters[order]]  # each sorted image: the size of its cluster
    first = np.repeat(np.cumsum(sizes)[clusters[order]] - per, per)
    step = np.arange(per.sum()) - np.repeat(np.cumsum(per) - per, per)
    return order[np.repeat(np.arange(len(order)), per)], order[first + step]


def leave_one_out_auroc(targets: np.ndarray, scores: np.ndarray, clusters: np.ndarray) -> np.ndarray:
    """AUROC of every column with cluster p (codes 0..P-1) left out, for every p -> (P, columns), in
    closed form: the Mann-Whitney count less the pairs the cluster's positives and negatives take
    part in, plus its own positive-negative pairs (taken off twice). NaN where a class runs out."""
    n_clusters = int(clusters.max()) + 1
    left, right = within_cluster_pairs(clusters)
    out = np.full((n_clusters, targets.shape[1]), np.nan)
    # Ranks of every column at once; within one class, the other class set to +inf (ranked above all,
    # so the class's own ranks among themselves are unchanged).
    positives = targets > 0
    ranks = rankdata(scores, axis=0)
    within_positives = rankdata(np.where(positives, scores, np.inf), axis=0)
    within_negatives = rankdata(np.where(positives, np.inf, scores), axis=0)
    for j in range(targets.shape[1]):
        positive, score = positives[:, j], scores[:, j]
        n_pos, n_neg = int(positive.sum()), int((~positive).sum())
        if not (n_pos and n_neg):
            continue
        below = ranks[positive, j] - within_positives[positive, j]  # per positive: negatives below it, ties half
        above = n_pos - (ranks[~positive, j] - within_negatives[~positive, j])  # per negative: positives above it
        pair = positive[left] & ~positive[right]
        won = (score[left[pair]] > score[right[pair]]) + 0.5 * (score[left[pair]] == score[right[pair]])
        count = (below.sum() - np.bincount(clusters[positive], below, n_clusters)
                 - np.bincount(clusters[~positive], above, n_clusters) + np.bincount(clusters[left[pair]], won, n_clusters))
        pairs = (n_pos - np.bincount(clusters[positive], minlength=n_clusters)) * (n_neg - np.bincount(clusters[~positive], minlength=n_clusters))
        with np.errstate(invalid="ignore", divide="ignore"):
            out[:, j] = np.where(pairs > 0, count / pairs, np.nan)
    return out
