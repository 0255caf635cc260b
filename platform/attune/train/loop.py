"""The per-worker training loop: plain PyTorch, no Ray.

    result = train_loop(recipe, base_path, Loop(train_batches=..., eval_batches=...))

Ray Train calls it in every worker (attune.train.trainer wires it up); a benchmark or a debugger calls
it directly in one process. What it needs from outside comes in through `Loop`: the batches, a
`report` hook for metrics and checkpoints, the checkpoint to resume from, and for a method that
samples (GRPO) the rollout engines. What it minimises comes from the recipe's method
(attune.train.methods), which for GRPO also turns each step's prompts into its training batches
and syncs the engines after the step; the model from attune.train.model.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import get_scheduler

from attune.recipe import Recipe
from attune.train import checkpoints, methods, parallel
from attune.train.checkpoints import MODEL_DIR
from attune.train.faults import maybe_inject_fault
from attune.train.methods import FROZEN_COPY
from attune.train.model import placed_model
from attune.train.rollouts import Rollouts
from attune.train.throughput import flops_per_token, peak_flops


@dataclass
class Loop:
    train_batches: Callable[[int], Iterable[dict]]  # epoch -> batches of tensors
    eval_batches: Callable[[], Iterable[dict]] | None = None
    steps_per_epoch: int | None = None  # needed when the recipe counts epochs
    # (metrics, checkpoint directory or None) -> None; every rank calls it at the same steps
    report: Callable[[dict, str | None], None] = lambda metrics, ckpt: None
    resume_from: str | None = None  # a checkpoint directory written by this loop
    stop_at: int | None = None  # end (evaluated and checkpointed) at this step, short of max_steps
    checkpoint_root: str | None = "/tmp/attune-checkpoints"  # None: no checkpoints (benchmarks)
    rollouts: "Rollouts | None" = None  # the engines a method that samples (GRPO) samples from
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


def train_loop(recipe: Recipe, base_path: str, loop: Loop) -> dict:
    """Run the recipe's optimisation; returns the final metrics (on every rank)."""
    torch.manual_seed(recipe.optim.seed)
    o, device = recipe.optim, loop.device
    max_steps = o.max_steps or math.ceil(o.epochs * loop.steps_per_epoch)
    method = methods.get(recipe.method.objective)
    model = placed_model(recipe, base_path, device)
    flops = flops_per_token(parallel.unwrap(model), recipe.data.max_seq_len)
    reference = (placed_model(recipe, base_path, device, frozen=True)
                 if method.reference(recipe) == FROZEN_COPY else None)
    objective = method.objective(recipe, model, reference)
    online = None
    if method.engines(recipe) is not None:
        if loop.rollouts is None:
            raise ValueError(f"method {method.name} samples from rollout engines: give Loop(rollouts=...)")
        online = method.online(recipe, loop.rollouts)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay,
                                  fused=device.type == "cuda" and not recipe.memory.cpu_offload)
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[o.schedule]
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=o.warmup_steps,
                              num_training_steps=max_steps)

    step, history = 0, []
    if loop.resume_from:
        state, history = checkpoints.load(loop.resume_from, model, optimizer)
        scheduler.load_state_dict(state["scheduler"])
        _apply_recipe_hyperparameters(optimizer, scheduler, o)
        step = state["step"]
        _log(f"resumed from step {step} ({loop.resume_from})")

    batches = _endless(loop.train_batches, start_epoch=step // (loop.steps_per_epoch or max_steps))
    if online is not None:
        online.start(model, step)
        batches = online.batches(batches)
        if step == 0 and loop.eval_batches is not None:  # where the reward curve starts
            first = {"step": 0, **online.evaluate(loop.eval_batches())}
            history.append(first)
            loop.report(first, None)
            _log(f"step 0/{max_steps} | eval reward {first['eval_reward']:.3f} (before training)")
    peak = peak_flops(device)
    window_tokens, window_start, metrics = 0.0, time.perf_counter(), {}
    end = min(max_steps, loop.stop_at or max_steps)
    if step >= end and history:
        # Resumed at its end: the run finished, but whoever waited on it may not have heard (a Tune
        # trial interrupted right after its last step). Say the last report again, not nothing.
        loop.report(history[-1], _copy_checkpoint(loop.resume_from, step, loop))
        return history[-1]
    model.train()
    while step < end:
        micro = [_to(next(batches), device) for _ in range(o.grad_accum_steps)]
        (count,) = parallel.all_reduce_sum([sum(objective.count(b) for b in micro)], device)
        loss_sum, sums = 0.0, {}
        for i, batch in enumerate(micro):
            with parallel.sync_gradients(model, sync=i == len(micro) - 1):
                total, more = objective(model, batch)
                # DDP and FSDP average gradients over ranks; scale so the step's loss is the
                # mean over every unit (labelled token, preference pair) on every rank.
                (total * parallel.world_size() / max(count, 1)).backward()
            loss_sum += total.item()
            sums = {k: sums.get(k, 0.0) + v for k, v in more.items()}
            window_tokens += float(batch["num_tokens"].sum())
        grad_norm = (torch.nn.utils.clip_grad_norm_(params, o.max_grad_norm)
                     if o.max_grad_norm else None)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        sampled = {}
        if online is not None:
            online.after_step(model, step)
            sampled = online.take_metrics()  # the same names on every rank: averaged over them

        loss_total, tokens_total, *more = parallel.all_reduce_sum(
            [loss_sum, window_tokens, *sums.values(), *sampled.values()], device)
        metrics = {"step": step, "loss": loss_total / max(count, 1),
                   "lr": scheduler.get_last_lr()[0],
                   **{k: v / max(count, 1) for k, v in zip(sums, more)},
                   **{k: v / parallel.world_size() for k, v in zip(sampled, more[len(sums):])}}
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        at_eval = step % recipe.eval.every_steps == 0 or step == end
        at_checkpoint = step % recipe.checkpoint.every_steps == 0 or step == end
        if step % recipe.eval.log_every_steps == 0 or at_eval or at_checkpoint:
            elapsed = time.perf_counter() - window_start
            metrics["tokens_per_s"] = tokens_total / elapsed
            if peak:
                metrics["mfu"] = metrics["tokens_per_s"] / parallel.world_size() * flops / peak
        if at_eval and loop.eval_batches is not None:
            if online is not None:
                metrics.update(online.evaluate(loop.eval_batches()))
            else:
                metrics["eval_loss"] = evaluate(objective, model, loop.eval_batches(), device)
        if "tokens_per_s" in metrics:
            _log(_progress_line(metrics, max_steps))
        maybe_inject_fault(step)
        if at_eval or at_checkpoint:
            history.append(metrics)
            checkpoint = (_save_checkpoint(model, optimizer, scheduler, step, history, loop,
                                           with_model=step == end)
                          if at_checkpoint and loop.checkpoint_root else None)
            loop.report(metrics, checkpoint)
        if "tokens_per_s" in metrics:  # the next window times training steps only, not eval or saving
            window_tokens, window_start = 0.0, time.perf_counter()
    return metrics


def _apply_recipe_hyperparameters(optimizer, scheduler, o) -> None:
    """The recipe's lr and weight decay win over the ones saved with the optimizer state, so a
    run resumed with new values (Population Based Training's perturbations) trains with them."""
    scheduler.base_lrs = [o.lr] * len(optimizer.param_groups)
    # transformers' schedules are LambdaLR: lr = base lr x the schedule's factor at this step
    lrs = [base * factor(scheduler.last_epoch)
           for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group.update(initial_lr=o.lr, lr=lr, weight_decay=o.weight_decay)
    scheduler._last_lr = lrs


def evaluate(objective, model, batches: Iterable[dict], device: torch.device) -> float:
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            batch = _to(batch, device)
            loss, _ = objective(model, batch)
            total, count = total + loss.item(), count + objective.count(batch)
    model.train()
    total, count = parallel.all_reduce_sum([total, count], device)
    return total / max(count, 1)


def _save_checkpoint(model, optimizer, scheduler, step, history, loop: Loop,
                     with_model: bool) -> str:
    """Every rank writes its shards; at the run's end rank 0 also writes `model/` (HF format),
    gathered from all ranks, for the registry entry."""
    path = Path(loop.checkpoint_root) / f"step-{step:07d}"
    checkpoints.save(path, model, optimizer, scheduler, step, history, parallel.rank())
    if with_model:
        weights = parallel.trainable_state_dict(model)
        if parallel.rank() == 0:
            parallel.unwrap(model).save_pretrained(path / MODEL_DIR, state_dict=weights)
    return str(path)


def _copy_checkpoint(source: str, step: int, loop: Loop) -> str | None:
    """Rank 0's copy of a checkpoint, to report again (the report hook may delete what it gets)."""
    if parallel.rank() != 0 or not loop.checkpoint_root:
        return None
    return shutil.copytree(source, Path(loop.checkpoint_root) / f"step-{step:07d}", dirs_exist_ok=True)


def _endless(make_batches: Callable[[int], Iterable[dict]], start_epoch: int):
    epoch = start_epoch
    while True:
        empty = True
        for batch in make_batches(epoch):
            empty = False
            yield batch
        if empty:
            raise RuntimeError("the training data yielded no batches for this worker")
        epoch += 1


def _to(batch: dict, device: torch.device) -> dict:
    return {k: torch.as_tensor(v).to(device, non_blocking=True) for k, v in batch.items()}


def _progress_line(m: dict, max_steps: int) -> str:
    parts = [f"step {m['step']}/{max_steps}", f"loss {m['loss']:.4f}"]
    if "reward" in m:
        parts.append(f"reward {m['reward']:.3f}")
    if "eval_loss" in m:
        parts.append(f"eval {m['eval_loss']:.4f}")
    if "eval_reward" in m:
        parts.append(f"eval reward {m['eval_reward']:.3f}")
    parts += [f"lr {m['lr']:.2e}", f"{m['tokens_per_s']:,.0f} tok/s"]
    if "mfu" in m:
        parts.append(f"MFU {m['mfu']:.1%}")
    return " | ".join(parts)


def _log(line: str) -> None:
    if parallel.rank() == 0:
        # Written, not printed: in a Ray Train worker, Train's patched print hands each line to
        # its logger (stderr) and, as Ray wraps sys.stdout, to stdout too, so the driver would
        # show every progress line twice.
        sys.stdout.write(f"[attune] {line}\n")
        sys.stdout.flush()


