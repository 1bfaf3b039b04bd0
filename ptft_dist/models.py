"""Building the encoders with `transformers` from a ModelConfig, and exporting them.

Owns: model construction for each family, the names of each family's classification head
and LoRA targets, and writing a Hugging Face directory. No distributed code here.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForMaskedLM,
    BertConfig,
    ModernBertConfig,
    PretrainedConfig,
)

from .config import ModelConfig

log = logging.getLogger(__name__)

#: Modules that make up the classification head of each family; they always train.
HEAD_MODULES = {"bert": ["pooler", "classifier"], "modernbert": ["head", "classifier"]}
#: Linear layers of the encoder that get LoRA adapters by default.
LORA_TARGETS = {
    "bert": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "modernbert": ["Wqkv", "Wo", "Wi"],
}


def family_of(hf_config: PretrainedConfig) -> str:
    kind = hf_config.model_type
    if kind == "modernbert":
        return "modernbert"
    if kind in ("bert", "roberta"):
        return "bert"
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
    """A masked-LM model, freshly initialised, or loaded from ``cfg.init_from``."""
    if cfg.init_from:
        return AutoModelForMaskedLM.from_pretrained(cfg.init_from, attn_implementation="sdpa")
    return AutoModelForMaskedLM.from_config(hf_config, attn_implementation="sdpa")


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
    state_dict = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    model.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out
