"""The peak memory of a training step as torch's CPU allocator sees it: what the memory plan is
compared with on CPU (tests/test_memory_plan.py, bench/memory_plan.py).

    peak = measured_peak_bytes(recipe, base_path, batch)
"""

from __future__ import annotations

from torch.profiler import ProfilerActivity, profile

from attune.recipe import Recipe
from attune.train.loop import Loop, train_loop


def measured_peak_bytes(recipe: Recipe, base_path: str, batch: dict) -> int:
    """Peak of the bytes torch's CPU allocator holds over one training step on `batch` (building
    the model and optimizer counts too), from the profiler's allocation events in time order:
    what the memory plan is compared with on CPU."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train_loop(recipe, base_path, Loop(train_batches=lambda epoch: [batch], steps_per_epoch=1,
                                           checkpoint_root=None))
    held = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        held += event.self_cpu_memory_usage
        peak = max(peak, held)
    return peak
