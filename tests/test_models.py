import pytest
import torch

from ptft_dist import models
from ptft_dist.config import ModelConfig

SPECIAL = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_masked_only_head_equals_the_dense_head(family):
    torch.manual_seed(0)
    cfg = ModelConfig(
        family=family, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position_embeddings=64
    )
    model = models.build_mlm(cfg, models.mlm_config(cfg, vocab_size=100, special_ids=SPECIAL)).eval()
    assert isinstance(model, models.MaskedOnlyMLM)
    ids = torch.randint(5, 100, (3, 16))
    labels = torch.full_like(ids, -100)
    labels[:, 3] = ids[:, 3]
    labels[1, 7] = ids[1, 7]
    sparse = model(input_ids=ids, labels=labels)
    dense = model.mlm(input_ids=ids, labels=labels)
    assert sparse.logits.shape == (4, 100)
    torch.testing.assert_close(sparse.loss, dense.loss)
    torch.testing.assert_close(sparse.logits, dense.logits[labels != -100])
    inner, prefix = models.unwrap(model)
    assert inner is model.mlm and prefix == "mlm."


def test_flops_per_token_counts_the_encoder():
    cfg = ModelConfig(family="bert", hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072)
    hf = models.mlm_config(cfg, vocab_size=30522, special_ids=SPECIAL)
    flops = models.flops_per_token(hf, seq_len=128, mask_fraction=0.15)
    # BERT-base: 85M non-embedding parameters -> ~6 x 85M = 510M, plus attention and head
    assert 5.1e8 < flops < 5.6e8


@pytest.mark.parametrize("family", ["bert", "modernbert"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(family):
    grads = []
    for on in (False, True):
        torch.manual_seed(0)
        cfg = ModelConfig(
            family=family,
            hidden_size=32,
            num_layers=2,
            num_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
            activation_checkpointing=on,
        )
        model = models.build_mlm(cfg, models.mlm_config(cfg, vocab_size=100, special_ids=SPECIAL)).train()
        inner, _ = models.unwrap(model)
        assert inner.is_gradient_checkpointing is on
        ids = torch.randint(5, 100, (3, 16), generator=torch.Generator().manual_seed(1))
        labels = torch.where(torch.arange(16) % 4 == 0, ids, -100)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    assert len(grads[0][1]) == len(grads[1][1])
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("family", ["bert", "modernbert"])
def test_head_only_finetuning_trains_the_whole_head_and_nothing_else(family, tmp_path, tiny_dataset):
    """peft.method=head: every parameter of the family's head modules trains (BERT's pooler is
    named bert.pooler.*), the encoder stays frozen."""
    from preflight_helpers import make_model_dir

    from ptft_dist import adapters
    from ptft_dist import config as C

    base = make_model_dir(tmp_path / "base", tiny_dataset / "tokenizer", family=family)
    cfg = C.from_dict(C.FinetuneConfig, {"base_model": str(base), "peft": {"method": "head"}})
    model, got = adapters.build_classifier(cfg, ["a", "b"], {"zero_optimization": {"stage": 2}})
    assert got == family
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    heads = models.HEAD_MODULES[family]
    expected = {n for n, _ in model.named_parameters() if any(f".{h}." in f".{n}" for h in heads)}
    assert trainable == expected
    assert any("pooler" in n for n in trainable) == (family == "bert")
    assert not any(n.startswith(("bert.encoder", "model.layers")) for n in trainable)
