"""What a training method is: the `Method` base, its `Objective`, the reference kinds."""

from __future__ import annotations

from typing import ClassVar, Protocol

from attune.config import StrictConfig

FROZEN_COPY = "frozen copy"  # a second, frozen copy of the base model (full fine-tuning)
ADAPTERS_OFF = "adapters off"  # the trained model with its LoRA adapters switched off


class NoOptions(StrictConfig):
    """A method without fields of its own."""


class Objective(Protocol):
    """What a step minimises: a sum over the batch's units (labelled tokens, pairs, ...), which
    the loop divides by the units' count over every rank, so micro-batches, accumulation and
    workers weigh each unit alike; `sums` are more per-unit sums reported as means."""

    def count(self, batch: dict) -> int: ...

    def __call__(self, model, batch: dict) -> tuple["torch.Tensor", dict]: ...  # noqa: F821


class Method:
    """One training method. Subclasses set `name` and `formats` and give `rows` and `objective`;
    the rest has defaults for a method like SFT (one sequence per example, no reference)."""

    name: ClassVar[str]
    formats: ClassVar[tuple[str, ...]]  # data.format values it trains on
    Options: ClassVar[type[StrictConfig]] = NoOptions  # its fields under `method:`
    sequences_per_example: ClassVar[int] = 1  # rows one example puts through the model (DPO: 2)
    packs: ClassVar[bool] = True  # whether data.packing may put several examples in one row

    def rows(self, records: list, tokenizer, max_seq_len: int, packing: bool) -> list[dict]:
        """Records -> rows of numpy arrays of one length (the batches the objective reads)."""
        raise NotImplementedError

    def reference(self, recipe) -> str | None:
        """The reference model the objective compares with: None, FROZEN_COPY or ADAPTERS_OFF."""
        return None

    def objective(self, recipe, model, reference) -> Objective:
        """What the loop minimises; `reference` is the frozen copy where `reference()` asks for
        one, else None."""
        raise NotImplementedError

    def memory_terms(self, shape, recipe, sizes) -> dict[str, int]:
        """Bytes a worker's device holds for this method beyond the trained model's own terms
        (`sizes`: the plan's stored and compute bytes per value, and shards)."""
        if self.reference(recipe) == FROZEN_COPY:
            return {"reference model": shape.params * sizes.stored // sizes.shards}
        return {}
