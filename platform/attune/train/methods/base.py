"""What a training method is: the `Method` base, its `Objective`, the reference kinds."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
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


class Online(Protocol):
    """A method that learns from its own samples (GRPO), as the loop drives it."""

    def start(self, model, step: int) -> None: ...  # before the first step (a resumed run's too)

    def batches(self, data_batches: Iterator[dict]) -> Iterator[dict]: ...  # data -> training

    def after_step(self, model, step: int) -> None: ...  # after each optimizer step

    def take_metrics(self) -> dict[str, float]: ...  # this rank's, since the last call

    def evaluate(self, batches: Iterable[dict]) -> dict[str, float]: ...


class Method:
    """One training method. Subclasses set `name` and `formats` and give `rows` and `objective`;
    the rest has defaults for a method like SFT (one sequence per example, no reference)."""

    name: ClassVar[str]
    formats: ClassVar[tuple[str, ...]]  # data.format values it trains on
    Options: ClassVar[type[StrictConfig]] = NoOptions  # its fields under `method:`
    packs: ClassVar[bool] = True  # whether data.packing may put several examples in one row

    def sequences_per_example(self, recipe) -> int:
        """Sequences one example puts through the model (a DPO pair: 2, a GRPO prompt: its group)."""
        return 1

    def rows(self, records: list, tokenizer, max_seq_len: int, packing: bool) -> list[dict]:
        """Records -> rows of numpy arrays of one length (the batches the objective reads)."""
        raise NotImplementedError

    def check(self, recipe, records: list) -> None:
        """Before any worker starts: what the method can check of the recipe and its records
        (ConfigError or DataError, in one line)."""

    def reference(self, recipe) -> str | None:
        """The reference model the objective compares with: None, FROZEN_COPY or ADAPTERS_OFF."""
        return None

    def objective(self, recipe, model, reference) -> Objective:
        """What the loop minimises; `reference` is the frozen copy where `reference()` asks for
        one, else None."""
        raise NotImplementedError

    def engines(self, recipe) -> "EngineSpec | None":  # noqa: F821
        """The rollout engines it samples from (attune.train.rollouts), or None: it trains on the
        data's rows as they are."""
        return None

    def online(self, recipe, rollouts) -> "Online":
        """For a method with engines: what turns the data's batches into training batches each
        step and keeps the engines' weights in step with the model's."""
        raise NotImplementedError

    def memory_terms(self, shape, recipe, sizes) -> dict[str, int]:
        """Bytes a worker's device holds for this method beyond the trained model's own terms
        (`sizes`: the plan's stored and compute bytes per value, and shards)."""
        if self.reference(recipe) == FROZEN_COPY:
            return {"reference model": shape.params * sizes.stored // sizes.shards}
        return {}
