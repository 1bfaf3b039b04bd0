"""What a classification task is, apart from any model: its splits (read, stratified,
sampled), the order in which training examples are batched, and the metrics of predictions.

Owns nothing distributed and imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import FinetuneConfig
from .data.labeled import check_known_labels, label_order, read_examples


@dataclass
class Split:
    texts: list[str]
    pairs: list[str] | None
    labels: list[int]

    def take(self, idx) -> Split:
        idx = list(idx)
        return Split(
            [self.texts[i] for i in idx],
            [self.pairs[i] for i in idx] if self.pairs is not None else None,
            [self.labels[i] for i in idx],
        )

    def __len__(self) -> int:
        return len(self.texts)


def classification_metrics(gold: list[int], pred: list[int], names: list[str]) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1 and the confusion matrix."""
    k = len(names)
    confusion = np.zeros((k, k), dtype=np.int64)
    for g, p in zip(gold, pred):
        confusion[g, p] += 1
    tp = np.diag(confusion).astype(float)
    precision = np.divide(tp, confusion.sum(0), out=np.zeros(k), where=confusion.sum(0) > 0)
    recall = np.divide(tp, confusion.sum(1), out=np.zeros(k), where=confusion.sum(1) > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k), where=(precision + recall) > 0)
    present = confusion.sum(1) > 0  # macro over the classes that occur in the gold labels
    return {
        "accuracy": float(tp.sum() / max(len(gold), 1)),
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class": {
            n: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(confusion[i].sum()),
            }
            for i, n in enumerate(names)
        },
        "confusion_matrix": confusion.tolist(),
    }


def stratified_split(labels: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (kept, held out): a seeded ``fraction`` of each class is held out."""
    rng = np.random.default_rng(seed)
    keep, held = [], []
    for c in sorted(set(labels)):
        idx = [i for i, y in enumerate(labels) if y == c]
        rng.shuffle(idx)
        n = int(round(len(idx) * fraction))
        held += idx[:n]
        keep += idx[n:]
    return sorted(keep), sorted(held)


def load_splits(cfg: FinetuneConfig) -> tuple[list[str], Split, Split | None, Split]:
    """Label names and the train / validation / test splits (validation may be None)."""
    names, train, validation, test = carve_splits(cfg)
    return names, sample_training(cfg, train), validation, test


def carve_splits(cfg: FinetuneConfig) -> tuple[list[str], Split, Split | None, Split]:
    """The splits before ``task.train_examples`` sampling: label names, the training split
    (``task.train_file`` less what test and validation take of it), validation (may be None)
    and test. The one place that decides which example goes where."""
    task = cfg.task

    def read(path: str) -> tuple[list[str], list[str], list[str] | None]:
        got = read_examples(path, task.text_column, task.label_column, task.text_pair_column, task.mongo)
        return got[0], got[1], (got[2] if task.text_pair_column else None)

    texts, raw, pairs = read(task.train_file)
    names = label_order(raw)
    index = {n: i for i, n in enumerate(names)}
    train = Split(texts, pairs, [index[y] for y in raw])

    def other(path: str) -> Split:
        t, r, p = read(path)
        check_known_labels(path, task.label_column, r, index, task.train_file)
        return Split(t, p, [index[y] for y in r])

    if task.test_file:
        test = other(task.test_file)
    else:
        keep, held = stratified_split(train.labels, task.test_fraction, cfg.optim.seed + 1)
        train, test = train.take(keep), train.take(held)
    validation = None
    if task.validation_file:
        validation = other(task.validation_file)
    elif task.validation_fraction > 0 and cfg.eval_every_steps > 0:
        keep, held = stratified_split(train.labels, task.validation_fraction, cfg.optim.seed + 2)
        train, validation = train.take(keep), train.take(held)
    return names, train, validation, test


def sample_training(cfg: FinetuneConfig, train: Split) -> Split:
    """The examples a job trains on: a seeded stratified ``task.train_examples`` of the
    training split (all of it when unset)."""
    n = cfg.task.train_examples
    if n is None or n >= len(train.labels):
        return train
    _, sample = stratified_split(train.labels, n / len(train.labels), cfg.optim.seed + 3)
    return train.take(sample)


def training_texts(cfg: FinetuneConfig, examples: str = "trained") -> list[str]:
    """The texts of the examples a job trains on (``examples="trained"``) or of its whole
    training split (``"training_split"``), labels dropped: a text pair gives its two texts, one
    after the other. Never a validation or test text, whatever the task files."""
    _, train, _, _ = carve_splits(cfg)
    if examples == "trained":
        train = sample_training(cfg, train)
    if train.pairs is None:
        return list(train.texts)
    return [t for pair in zip(train.texts, train.pairs) for t in pair]


def class_weights(labels: list[int], num_classes: int, mode: str) -> list[float] | None:
    """Per-class weights of the training loss (``task.class_weights``): None for ``none``;
    ``balanced``: n / (k x n_c) over the n training examples and the k classes that occur in
    them (a class absent from the split weighs 0: it is never a target); ``sqrt``: the square
    root of the balanced weights."""
    if mode == "none":
        return None
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(float)
    present = counts > 0
    weights = np.zeros(num_classes)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    if mode == "sqrt":
        weights = np.sqrt(weights)
    elif mode != "balanced":
        raise ValueError(f"task.class_weights must be none, balanced or sqrt, got {mode!r}")
    return weights.tolist()


#: the share of training examples that ``task.max_length`` chosen from the data leaves whole
MAX_LENGTH_QUANTILE = 0.95


def choose_max_length(lengths: list[int], max_positions: int | None) -> int:
    """``task.max_length`` from the data: the 95th percentile of the training examples' lengths
    in tokens (special tokens included), at least 8, at most ``max_positions``."""
    if not lengths:
        raise ValueError("no training examples to choose task.max_length from")
    chosen = max(8, int(np.quantile(np.asarray(lengths), MAX_LENGTH_QUANTILE, method="higher")))
    return min(chosen, max_positions) if max_positions else chosen


def bucketed_order(order: np.ndarray, lengths: np.ndarray, global_batch: int, window: int = 50) -> np.ndarray:
    """Reorder so that each global batch holds examples of similar length: sort by length
    within windows of ``window`` global batches, then shuffle the batches of the window."""
    out = []
    span = global_batch * window
    rng = np.random.default_rng(int(order[0]) if len(order) else 0)
    for lo in range(0, len(order), span):
        chunk = order[lo : lo + span]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches = [chunk[i : i + global_batch] for i in range(0, len(chunk), global_batch)]
        full = [b for b in batches if len(b) == global_batch]
        rng.shuffle(full)
        out.extend(full + [b for b in batches if len(b) != global_batch])
    return np.concatenate(out) if out else order


class GlobalBatches:
    """The global batch of every step, the same on every rank and world size.

    Epoch e orders the examples by a permutation seeded by (seed, e), bucketed by length
    (:func:`bucketed_order`), and cuts that order into global batches (the rest is dropped).
    An epoch's order is computed once, when its first step asks (it is O(examples): per step,
    it cost a 67k-example task about 10 ms)."""

    def __init__(self, lengths: np.ndarray, global_batch_size: int, seed: int):
        self.lengths, self.global_batch_size, self.seed = lengths, global_batch_size, seed
        self.steps_per_epoch = len(lengths) // global_batch_size
        self._epoch, self._order = -1, lengths[:0]

    def of_step(self, step: int) -> tuple[int, np.ndarray]:
        """(epoch, example indices) of the global batch of 1-based ``step``."""
        epoch, g = divmod(step - 1, self.steps_per_epoch)
        if epoch != self._epoch:
            permutation = np.random.default_rng([self.seed, epoch]).permutation(len(self.lengths))
            self._epoch, self._order = epoch, bucketed_order(permutation, self.lengths, self.global_batch_size)
        return epoch, self._order[g * self.global_batch_size : (g + 1) * self.global_batch_size]
