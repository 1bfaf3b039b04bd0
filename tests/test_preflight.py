"""Every driver-side check runs before Ray starts (ptft_dist.preflight): each wrong input ends
in exit code 2 with the file or field named, at --dry-run and without it, and Ray (and torch)
never get imported; the run length is said as steps = epochs = tokens."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from preflight_helpers import make_model_dir, ptft_child

from ptft_dist import config as C
from ptft_dist import preflight as P
from ptft_dist.data.errors import DataError


@pytest.fixture(scope="module")
def base_model(tiny_dataset, tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("model") / "mb", tiny_dataset / "tokenizer")


@pytest.fixture
def task_files(tmp_path):
    train = tmp_path / "train.csv"
    rows = [f"sentence number {i} about {'cats' if i % 2 else 'dogs'},{'pos' if i % 2 else 'neg'}" for i in range(80)]
    train.write_text("sentence,label\n" + "\n".join(rows) + "\n")
    test = tmp_path / "test.csv"
    test.write_text("sentence,label\n" + "\n".join(rows[:10]) + "\n")
    return train, test


def _fails(proc_imported, *needles):
    proc, imported = proc_imported
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr
    assert imported == {"ray": False, "torch": False}, imported
    return proc.stderr


@pytest.mark.parametrize("dry_run", [["--dry-run"], []])
def test_the_issues_wrong_inputs_fail_before_ray_starts(tmp_path, dry_run, base_model):
    run = ["--run-dir", str(tmp_path / "run")]
    _fails(
        ptft_child("finetune", *dry_run, *run, "task.train_file=/nope.csv", f"base_model={base_model}"),
        "task.train_file",
        "/nope.csv",
    )
    _fails(ptft_child("pretrain", *dry_run, *run, "data.dataset_dir=/nope"), "data.dataset_dir", "/nope")
    _fails(ptft_child("data", "build", *dry_run, *run, "data.inputs=[/nope/*.txt]"), "ptft data build:", "/nope/*.txt")
    _fails(ptft_child("finetune", *dry_run, *run), "base_model is not set")
    assert not (tmp_path / "run").exists()


def test_several_problems_are_said_at_once(tmp_path):
    err = _fails(ptft_child("finetune", "--dry-run", "task.train_file=/nope.csv"), "2 problems")
    assert "/nope.csv" in err and "base_model is not set" in err


def test_base_model_must_hold_weights_and_a_matching_tokenizer(tmp_path, base_model, tiny_dataset):
    cfg = C.FinetuneConfig(base_model=str(base_model))
    assert P.check_base_model(cfg)["model_type"] == "modernbert"
    broken = tmp_path / "noweights"
    shutil.copytree(base_model, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(DataError, match="has no weights"):
        P.check_base_model(C.FinetuneConfig(base_model=str(broken)))
    notok = tmp_path / "notok"
    shutil.copytree(base_model, notok)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (notok / f).unlink(missing_ok=True)
    with pytest.raises(DataError, match="has no tokenizer"):
        P.check_base_model(C.FinetuneConfig(base_model=str(notok)))
    # config.json says a smaller vocabulary than the weights and the tokenizer have
    shrunk = tmp_path / "shrunk"
    shutil.copytree(base_model, shrunk)
    hf = json.loads((shrunk / "config.json").read_text())
    hf["vocab_size"] = 100
    (shrunk / "config.json").write_text(json.dumps(hf))
    with pytest.raises(DataError, match="not this config's"):
        P.check_base_model(C.FinetuneConfig(base_model=str(shrunk)))
    # weights and config agree, but the tokenizer has more tokens than the model
    small = make_model_dir(tmp_path / "small", tiny_dataset / "tokenizer", vocab_size=500)
    with pytest.raises(DataError, match="tokenizer is not the model's"):
        P.check_base_model(C.FinetuneConfig(base_model=str(small)))
    bert = make_model_dir(tmp_path / "bert", tiny_dataset / "tokenizer", family="bert")
    with pytest.raises(DataError, match="needs a ModernBERT model"):
        P.check_base_model(C.FinetuneConfig(base_model=str(bert), pooling="mean"))


def test_task_files_need_their_columns_two_labels_and_known_test_labels(tmp_path, task_files):
    train, test = task_files

    def task(**kw):
        return C.FinetuneConfig(task=C.TaskConfig(**{"text_column": "sentence", **kw}))

    got = P.check_task(task(train_file=str(train), test_file=str(test)))
    assert got.train_file_counts == {"neg": 40, "pos": 40} and got.num_test == 10
    with pytest.raises(DataError, match="no column 'text'"):
        P.check_task(task(train_file=str(train), text_column="text"))
    one = tmp_path / "one.csv"
    one.write_text("sentence,label\na,x\nb,x\n")
    with pytest.raises(DataError, match="1 distinct label"):
        P.check_task(task(train_file=str(one)))
    odd = tmp_path / "odd.csv"
    odd.write_text("sentence,label\na,neg\nb,maybe\n")
    with pytest.raises(DataError, match=r"task.test_file: .*\['maybe'\]"):
        P.check_task(task(train_file=str(train), test_file=str(odd)))


def test_examples_per_class_follow_the_recipes_splits(tmp_path, task_files):
    """Held-out test and validation shares and train_examples, per class as the recipe splits."""
    from ptft_dist.classify import load_splits

    train, _ = task_files
    cfg = C.FinetuneConfig(
        task=C.TaskConfig(train_file=str(train), text_column="sentence", train_examples=50, test_fraction=0.2),
        eval_every_steps=5,
    )
    got = P.check_task(cfg)
    names, split, validation, test = load_splits(cfg)
    counted = {n: split.labels.count(i) for i, n in enumerate(names)}
    assert got.train_counts == counted and got.num_train == len(split.labels)
    assert got.num_validation == len(validation.labels) and got.num_test == len(test.labels)


def test_dataset_checks_manifest_shards_tokenizer_and_model_fit(tmp_path, tiny_dataset, base_model):
    model = C.ModelConfig()
    assert P.check_dataset(str(tiny_dataset), model)["seq_len"] == 64
    with pytest.raises(DataError, match="max_position_embeddings 32"):
        P.check_dataset(str(tiny_dataset), C.ModelConfig(max_position_embeddings=32))
    copy = tmp_path / "copy"
    shutil.copytree(tiny_dataset, copy)
    shard = copy / json.loads((copy / "manifest.json").read_text())["splits"]["train"]["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(DataError, match="is truncated: 1,000 bytes, manifest.json says"):
        P.check_dataset(str(copy), model)
    shard.unlink()
    with pytest.raises(DataError, match="listed in manifest.json is missing"):
        P.check_dataset(str(copy), model)
    other = tmp_path / "other"
    shutil.copytree(tiny_dataset, other)
    tok = json.loads((other / "tokenizer" / "tokenizer.json").read_text())
    tok["model"]["vocab"]["zzzz"] = len(tok["model"]["vocab"])
    (other / "tokenizer" / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(DataError, match="does not match the sha256 in manifest.json"):
        P.check_dataset(str(other), model)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="manifest.json does not exist"):
        P.check_dataset(str(tmp_path / "empty"), model)
    # a model to continue from must fit the data (its tokenizer is the dataset's here)
    assert P.check_dataset(str(tiny_dataset), C.ModelConfig(init_from=str(base_model)))


def test_epochs_and_tokens_turn_into_steps():
    optim = C.OptimConfig(global_batch_size=32, max_steps=None, max_epochs=1.0)
    assert C.max_steps_for(optim, 5452) == 170  # floor(5452 / 32): never more data than asked
    assert C.max_steps_for(C.OptimConfig(global_batch_size=32, max_steps=None, max_epochs=2.5), 1000) == 78
    assert C.max_steps_for(C.OptimConfig(global_batch_size=16, max_steps=None, max_tokens=10**6), 1, 128) == 488
    assert C.max_steps_for(C.OptimConfig(global_batch_size=32, max_steps=None, max_epochs=1e-6), 5452) == 1
    assert C.max_steps_for(C.OptimConfig(max_steps=7), 10) == 7
    length = C.run_length(C.OptimConfig(global_batch_size=32, max_steps=600), 21_000, 128)
    assert (length.steps, length.samples, length.tokens) == (600, 19_200, 2_457_600)
    assert abs(length.epochs - 19_200 / 21_000) < 1e-12
    with pytest.raises(C.ConfigError, match="fewer than one global batch"):
        C.max_steps_for(C.OptimConfig(global_batch_size=32, max_steps=None, max_epochs=1.0), 10)
    with pytest.raises(C.ConfigError, match="seq_len"):
        C.max_steps_for(C.OptimConfig(max_steps=None, max_tokens=1000), 100)


def test_exactly_one_run_length(tmp_path):
    cfg = C.load("finetune", None, ["optim.max_epochs=2"])  # the override clears the preset's max_steps
    assert (cfg.optim.max_steps, cfg.optim.max_epochs) == (None, 2.0)
    cfg = C.load("finetune", None, ["optim.max_epochs=2", "optim.max_steps=10"])  # the last one said wins
    assert (cfg.optim.max_steps, cfg.optim.max_epochs) == (10, None)
    both = tmp_path / "both.yaml"
    both.write_text(yaml.safe_dump({"optim": {"max_steps": 10, "max_epochs": 1}}))
    with pytest.raises(C.ConfigError, match=r"optim.max_steps and optim.max_epochs"):
        C.load("pretrain", str(both))
    one = tmp_path / "one.yaml"
    one.write_text(yaml.safe_dump({"optim": {"max_epochs": 1}}))
    assert C.load("pretrain", str(one)).optim.max_steps is None
    with pytest.raises(C.ConfigError, match="exactly one"):
        C.OptimConfig(max_steps=None).check("optim")
    with pytest.raises(C.ConfigError, match="max_tokens: finetuning examples are not packed"):
        C.load("finetune", None, ["optim.max_tokens=1000"])
    with pytest.raises(C.ConfigError, match="in a pipeline the dataset is built first"):
        P.preflight("pipeline", C.load("pipeline", None, ["pretrain.optim.max_epochs=1"]))


def test_dry_run_says_steps_epochs_tokens_and_examples_per_class(tiny_dataset, base_model):
    proc, imported = ptft_child("pretrain", "--dry-run", f"data.dataset_dir={tiny_dataset}", "optim.max_epochs=2")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tiny_dataset / "manifest.json").read_text())
    n = manifest["splits"]["train"]["num_samples"]
    steps = 2 * n // 16
    assert f"run length (optim.max_epochs=2.0): {steps:,} steps = " in proc.stdout
    assert f"({steps * 16:,} samples) = " in proc.stdout and "tokens of this dataset" in proc.stdout
    assert imported == {"ray": False, "torch": False}
    proc, _ = ptft_child("finetune", "--dry-run", f"base_model={base_model}")
    assert proc.returncode == 0, proc.stderr
    assert "training examples per class: ABBR 86, DESC 1,162, ENTY 1,250, HUM 1,223, LOC 835, NUM 896" in proc.stdout
    # finetune_tiny: 50 steps of 32 over TREC-6's 5,452 training questions
    assert "run length (optim.max_steps=50): 50 steps = 0.293 epochs (1,600 examples)" in proc.stdout


def test_preflight_returns_the_config_to_run_in_steps(tiny_dataset):
    cfg = C.load("pretrain", None, [f"data.dataset_dir={tiny_dataset}", "optim.max_tokens=20000"])
    run = P.preflight("pretrain", cfg).cfg
    assert run.optim.max_steps == 20000 // (16 * 64) and run.optim.max_tokens is None
    run.check()
