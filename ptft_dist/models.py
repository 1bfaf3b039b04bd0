"""Building the encoders with `transformers` from a ModelConfig, and exporting them.

Owns: model construction for each family, the names of each family's classification head
and LoRA targets, and writing a Hugging Face directory. No distributed code here.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import (
    AutoConfig,
    AutoModelForMaskedLM,
    BertConfig,
    ModernBertConfig,
    PretrainedConfig,
    RobertaConfig,
)
from transformers.modeling_outputs import MaskedLMOutput

from .config import ModelConfig

log = logging.getLogger(__name__)

#: Modules that make up the classification head of each family; they always train.
HEAD_MODULES = {"bert": ["pooler", "classifier"], "roberta": ["classifier"], "modernbert": ["head", "classifier"]}
#: Linear layers of the encoder that get LoRA adapters by default.
LORA_TARGETS = {
    "bert": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "roberta": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "modernbert": ["Wqkv", "Wo", "Wi"],
}
#: IA3 (target modules, of which feed-forward): keys, values and the feed-forward output.
IA3_TARGETS = {
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
    "roberta": (["key", "value", "output.dense"], ["output.dense"]),
    "modernbert": (["Wqkv", "mlp.Wo"], ["mlp.Wo"]),
}
#: Attribute holding the MLM head of the families whose head transformers runs densely.
MLM_HEAD = {"bert": "cls", "roberta": "lm_head"}


def family_of(hf_config: PretrainedConfig) -> str:
    kind = hf_config.model_type
    if kind in ("modernbert", "bert", "roberta"):
        return kind
    raise ValueError(f"model type {kind!r} is not supported; supported: bert, roberta, modernbert")


def mlm_config(cfg: ModelConfig, *, vocab_size: int, special_ids: dict[str, int]) -> PretrainedConfig:
    """A `transformers` config for a masked LM of this family and size."""
    if cfg.init_from:
        return AutoConfig.from_pretrained(cfg.init_from)
    common = dict(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        pad_token_id=special_ids["pad"],
    )
    if cfg.family == "bert":
        return BertConfig(**common, hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout)
    if cfg.family == "roberta":
        # RoBERTa numbers positions from pad_token_id + 1, so it needs two extra slots.
        common["max_position_embeddings"] += 2
        return RobertaConfig(
            **common,
            bos_token_id=special_ids["cls"],
            eos_token_id=special_ids["sep"],
            hidden_dropout_prob=cfg.dropout,
            attention_probs_dropout_prob=cfg.dropout,
        )
    return ModernBertConfig(
        **common,
        cls_token_id=special_ids["cls"],
        sep_token_id=special_ids["sep"],
        bos_token_id=special_ids["cls"],
        eos_token_id=special_ids["sep"],
        # Global attention in every layer: at the short sequence lengths of pretraining a
        # sliding window saves nothing.
        layer_types=["full_attention"] * cfg.num_layers,
        attention_dropout=cfg.dropout,
        mlp_dropout=cfg.dropout,
        embedding_dropout=cfg.dropout,
        # The MLM head runs only at masked positions (labels != -100): ~2x faster here.
        sparse_prediction=True,
    )


def build_mlm(cfg: ModelConfig, hf_config: PretrainedConfig) -> torch.nn.Module:
    """A masked-LM model, freshly initialised, or loaded from ``cfg.init_from``, that runs
    its prediction head only at masked positions (see :class:`MaskedOnlyMLM`)."""
    if cfg.init_from:
        model = AutoModelForMaskedLM.from_pretrained(cfg.init_from, attn_implementation="sdpa")
    else:
        model = AutoModelForMaskedLM.from_config(hf_config, attn_implementation="sdpa")
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if model.config.model_type in MLM_HEAD:
        return MaskedOnlyMLM(model)
    return model  # ModernBERT: sparse_prediction does the same inside transformers


class MaskedOnlyMLM(torch.nn.Module):
    """Runs the encoder of a BERT/RoBERTa masked LM, then its head only at the positions with
    a label (~15-30% of tokens): the vocabulary projection is the largest matmul of a small
    model, so this saves most of the head's compute and memory. Weights are those of the
    wrapped model (``.mlm``); exports unwrap it."""

    def __init__(self, mlm: torch.nn.Module):
        super().__init__()
        self.mlm = mlm
        self.config = mlm.config

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> MaskedLMOutput:
        encoder = getattr(self.mlm, self.mlm.base_model_prefix)
        hidden = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        flat = labels.reshape(-1)
        picked = flat != -100
        logits = getattr(self.mlm, MLM_HEAD[self.config.model_type])(hidden.reshape(-1, hidden.size(-1))[picked])
        return MaskedLMOutput(loss=F.cross_entropy(logits.float(), flat[picked]), logits=logits)


def unwrap(model: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    """The transformers model inside, and the prefix its parameter names carry outside."""
    if isinstance(model, MaskedOnlyMLM):
        return model.mlm, "mlm."
    return model, ""


def flops_per_token(config: PretrainedConfig, seq_len: int, mask_fraction: float) -> float:
    """Training FLOPs per input token (forward + backward = 3x forward), PaLM-style:
    6 x non-embedding parameters of the encoder (2 per multiply-add, x3 for backward)
    + 12 x layers x hidden x seq_len for the attention scores and weighted sum
    + 6 x hidden x vocab x mask_fraction for the MLM projection, run at masked positions only.
    """
    h, n_layers = config.hidden_size, config.num_hidden_layers
    inter = config.intermediate_size
    glu = 2 if config.model_type == "modernbert" else 1  # GeGLU's input projection is doubled
    per_layer = 4 * h * h + (glu + 1) * h * inter
    return 6.0 * n_layers * per_layer + 12.0 * n_layers * h * seq_len + 6.0 * h * config.vocab_size * mask_fraction


def max_input_tokens(hf_config: PretrainedConfig) -> int | None:
    """The longest input the model takes, in tokens (RoBERTa numbers positions from
    pad_token_id + 1: two of its slots are never used)."""
    positions = getattr(hf_config, "max_position_embeddings", None)
    if positions is None:
        return None
    return positions - 2 if hf_config.model_type == "roberta" else positions


def pooling_kwargs(family: str, pooling: str) -> dict:
    """Config overrides that make the classifier pool the way ``pooling`` says (only
    ModernBERT can pool otherwise than by the first token: ``preflight.check_base_model``
    refuses the rest)."""
    return {"classifier_pooling": pooling} if family == "modernbert" else {}


def masked_logits_and_labels(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels at masked positions, for dense heads ([B, T, V]) and masked-only
    heads (ModernBERT's sparse prediction returns [num_masked, V])."""
    flat = labels.reshape(-1)
    picked = flat[flat != -100]
    if logits.dim() == 2:
        return logits, picked
    return logits.reshape(-1, logits.size(-1))[flat != -100], picked


def num_params(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Parameter count; under ZeRO-3 a partitioned parameter counts its full size (ds_numel)."""
    total = 0
    for p in model.parameters():
        if trainable_only and not p.requires_grad:
            continue
        total += getattr(p, "ds_numel", p.numel())
    return total


def save_hf(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], tokenizer, out_dir: str | Path) -> Path:
    """Write an HF directory (config, safetensors weights, tokenizer). Rank 0 only."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, prefix = unwrap(model)
    state_dict = {k.removeprefix(prefix): v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    model.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out
