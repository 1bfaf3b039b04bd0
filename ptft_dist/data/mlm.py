"""Dynamic masking for masked-LM training, and the seed formula that makes it resumable.

The mask of a micro batch depends only on (seed, rank, step, micro batch index), so a resumed
run draws exactly the masks the uninterrupted run would have drawn, without saving any
generator state. Under elastic determinism (``global_micro``) it depends on (seed, step, the
micro batch's index in the global step) instead, which no world size changes: the same
samples get the same masks on any number of ranks. The held-out set has one fixed mask, drawn
once from the seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: a large prime: mixes seed, rank and step into one generator seed without collisions
_MIX = 1_000_003
#: micro batches per optimizer step that get distinct masks (gradient accumulation below this)
MAX_MICRO_BATCHES = 64


def mask_tokens(
    ids: torch.Tensor,
    *,
    mlm_probability: float,
    mask_id: int,
    vocab_size: int,
    special_ids: list[int],
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic BERT masking: choose ``mlm_probability`` of the non-special tokens; of those
    80% become [MASK], 10% a random token, 10% stay. Returns (input_ids, labels) with
    labels = -100 where nothing is predicted."""
    ids = ids.long()
    labels = ids.clone()
    special = torch.zeros_like(ids, dtype=torch.bool)
    for s in special_ids:
        special |= ids == s
    chosen = (torch.rand(ids.shape, generator=generator) < mlm_probability) & ~special
    labels[~chosen] = -100
    roll = torch.rand(ids.shape, generator=generator)
    inputs = ids.clone()
    inputs[chosen & (roll < 0.8)] = mask_id
    randomize = chosen & (roll >= 0.8) & (roll < 0.9)
    inputs[randomize] = torch.randint(vocab_size, ids.shape, generator=generator)[randomize]
    return inputs, labels


@dataclass(frozen=True)
class Masker:
    """Masks token ids the way a pretraining run does: the masking numbers of the dataset
    (its [MASK] id, vocabulary and special tokens) and the run's seed."""

    mlm_probability: float
    mask_id: int
    vocab_size: int
    special_ids: tuple[int, ...]
    seed: int
    global_micro: bool = False

    @classmethod
    def for_dataset(cls, manifest: dict, mlm_probability: float, seed: int, *, global_micro: bool = False) -> Masker:
        special = manifest["tokenizer"]["special_ids"]
        return cls(
            mlm_probability=mlm_probability,
            mask_id=special["mask"],
            vocab_size=manifest["vocab_size"],
            special_ids=(special["cls"], special["sep"], special["pad"]),
            seed=seed,
            global_micro=global_micro,
        )

    def _mask(self, ids: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        return mask_tokens(
            ids,
            mlm_probability=self.mlm_probability,
            mask_id=self.mask_id,
            vocab_size=self.vocab_size,
            special_ids=list(self.special_ids),
            generator=torch.Generator().manual_seed(seed),
        )

    def train(
        self, ids: torch.Tensor, *, rank: int, step: int, micro: int, accum: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels) of micro batch ``micro`` (of ``accum``) of optimizer step ``step`` on ``rank``."""
        if self.global_micro:  # micro batch rank*accum + micro of the global step, whatever the world size
            return self._mask(ids, ((self.seed * _MIX + step) * _MIX + rank * accum + micro) * 2 + 1)
        return self._mask(ids, ((self.seed * _MIX + rank) * _MIX + step) * MAX_MICRO_BATCHES + micro)

    def held_out(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels) of the held-out set: one fixed mask, the same on every rank and run."""
        return self._mask(ids, self.seed + _MIX)
