"""Training checkpoints: sharded with torch.distributed.checkpoint (DCP), resumable on any number
of workers, and the plain Hugging Face model a registry entry needs.

    step-0000040/
      sharded/          DCP: every rank writes its own shards of the trainable weights and the
                        optimizer state (no gather on rank 0); Ray Train merges the ranks' files
      trainer_state.pt  scheduler and step (rank 0)
      history.json      the reports so far (rank 0)
      model/            HF safetensors (or a LoRA adapter), gathered on rank 0: at the last step
                        of a run (or of a Tune trial's stretch) only, for its registry entry
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

SHARDED_DIR = "sharded"
STATE_FILE = "trainer_state.pt"
HISTORY_FILE = "history.json"
MODEL_DIR = "model"

# Frozen weights (a LoRA run's base model) are the base model's: not saved again, and not
# expected back when loading.
_TRAINABLE = StateDictOptions(ignore_frozen_params=True)
_INTO_TRAINABLE = StateDictOptions(ignore_frozen_params=True, strict=False)


def save(path: Path, model, optimizer, scheduler, step: int, history: list[dict],
         rank: int) -> None:
    """Every rank writes its shards into its own `path` (collective)."""
    state = {"model": get_model_state_dict(model, options=_TRAINABLE),
             "optimizer": get_optimizer_state_dict(model, optimizer, options=_TRAINABLE)}
    dcp.save(state, checkpoint_id=str(path / SHARDED_DIR), no_dist=not dist.is_initialized())
    if rank == 0:
        torch.save({"scheduler": scheduler.state_dict(), "step": step}, path / STATE_FILE)
        (path / HISTORY_FILE).write_text(json.dumps(history))


def load(path: str, model, optimizer) -> tuple[dict, list[dict]]:
    """Load a checkpoint written by any number of ranks into this run's shards (collective);
    returns the trainer state and the history."""
    state = {"model": get_model_state_dict(model, options=_TRAINABLE),
             "optimizer": get_optimizer_state_dict(model, optimizer, options=_TRAINABLE)}
    dcp.load(state, checkpoint_id=os.path.join(path, SHARDED_DIR), no_dist=not dist.is_initialized())
    set_model_state_dict(model, state["model"], options=_INTO_TRAINABLE)
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=_INTO_TRAINABLE)
    trainer_state = torch.load(os.path.join(path, STATE_FILE), weights_only=False)
    return trainer_state, json.loads(Path(path, HISTORY_FILE).read_text())
