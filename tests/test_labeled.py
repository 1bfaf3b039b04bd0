import json

import numpy as np
import pytest

from ptft_dist.classify import GlobalBatches, bucketed_order, classification_metrics
from ptft_dist.config import TaskConfig
from ptft_dist.data.build import DataError
from ptft_dist.data.labeled import label_order, materialize_trec, read_examples, resolve_task


def test_trec_is_5452_train_and_500_test(tmp_path):
    train, test = materialize_trec(tmp_path)
    _, train_labels = read_examples(train, "text", "label")
    test_texts, test_labels = read_examples(test, "text", "label")
    assert len(train_labels) == 5452 and len(test_labels) == 500
    assert test_texts[0] == "How far is it from Denver to Aspen ?"
    assert max(test_labels.count(c) for c in set(test_labels)) == 138  # DESC: majority 27.6%
    assert sorted(set(train_labels)) == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]


def test_csv_tsv_jsonl(tmp_path):
    (tmp_path / "a.csv").write_text('sentence,y\n"hello, world",1\nbye,0\n')
    (tmp_path / "a.tsv").write_text('y\tsentence\n1\thello "world\n0\tbye\n')
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"sentence": "hello", "y": 1}) + "\n" + json.dumps({"sentence": "bye", "y": 0}) + "\n"
    )
    assert read_examples(tmp_path / "a.csv", "sentence", "y") == (["hello, world", "bye"], ["1", "0"])
    assert read_examples(tmp_path / "a.tsv", "sentence", "y") == (['hello "world', "bye"], ["1", "0"])
    assert read_examples(tmp_path / "a.jsonl", "sentence", "y") == (["hello", "bye"], ["1", "0"])
    assert label_order(["10", "9", "1"]) == ["1", "9", "10"]


def test_task_errors_name_file_and_column(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\na,x\nb,y\n")
    (tmp_path / "test.csv").write_text("text,label\na,x\nc,z\n")
    with pytest.raises(DataError, match=r"no column 'sentence'.*columns: 'text', 'label'"):
        read_examples(tmp_path / "train.csv", "sentence", "label")
    with pytest.raises(DataError, match=r"test\.csv: labels \['z'\].*never occur"):
        resolve_task(TaskConfig(train_file=str(tmp_path / "train.csv"), test_file=str(tmp_path / "test.csv")), tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        resolve_task(TaskConfig(train_file=str(tmp_path / "nope.csv")), tmp_path)


def test_classification_metrics():
    s = classification_metrics([0, 0, 1, 1, 2], [0, 1, 1, 1, 0], ["a", "b", "c"])
    assert s["accuracy"] == pytest.approx(3 / 5)
    # f1: a: p=1/2 r=1/2 -> .5 ; b: p=2/3 r=1 -> .8 ; c: 0
    assert s["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert s["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]


def test_global_batches_cover_each_epoch_once_in_buckets_of_similar_length():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 60, size=1000)
    batches = GlobalBatches(lengths, global_batch_size=32, seed=7)
    assert batches.steps_per_epoch == 31  # 1000 // 32: the rest of each epoch is dropped
    for epoch in range(2):
        steps = range(epoch * 31 + 1, (epoch + 1) * 31 + 1)
        got = [batches.of_step(step) for step in steps]
        assert {e for e, _ in got} == {epoch}
        seen = np.concatenate([b for _, b in got])
        assert len(seen) == len(set(seen.tolist())) == 992
        # each epoch's order is its own seeded permutation, bucketed: made once, the same each time
        order = bucketed_order(np.random.default_rng([7, epoch]).permutation(1000), lengths, 32)
        np.testing.assert_array_equal(seen, order[:992])
        spread = np.mean([np.ptp(lengths[b]) for _, b in got])
        assert spread < 0.5 * np.ptp(lengths), "a global batch holds examples of similar length"
    assert not np.array_equal(batches.of_step(1)[1], batches.of_step(32)[1])  # epochs differ
    np.testing.assert_array_equal(GlobalBatches(lengths, 32, 7).of_step(40)[1], batches.of_step(40)[1])
