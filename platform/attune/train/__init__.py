"""Fine-tuning on Ray Train: the recipe's data into rows, the rows through the loop on every
worker, the result into the registry.

    from attune.train.trainer import fine_tune
    entry = fine_tune(load_recipe("recipes/tiny-full.yaml"))

trainer.py      the Ray Train wiring: TorchTrainer, fine_tune(), the run's registry entry
loop.py         the per-worker loop, plain PyTorch (runs without Ray: benchmarks, debuggers)
methods/        what a method is (sft, dpo): its fields, rows, loss, reference, memory terms
model.py        the model a worker trains: built, LoRA'd, compiled, wrapped, weights placed
parallel.py     DDP / FSDP2 wrapping, collectives, rank 0's broadcast
loss.py         the model and its next-token loss as one module (chunked; per-sequence)
checkpoints.py  sharded checkpoints, resumable on any number of workers
records.py      JSONL lines in five formats, checked on the driver (file:line errors)
tokenizing.py   a record through its chat template: ids and labels
rows.py         packing and padding samples into rows
datasets.py     the recipe's records as Ray Datasets of rows (the method makes them)
preflight.py    what the driver checks before any cluster work
memory_plan.py  a worker's device memory, from the model's config and the recipe
memory_profile.py, throughput.py, faults.py   beside the loop: the measured peak, MFU, a
                fault injected for the recovery tests
rewards.py      verifiable rewards for reinforcement learning
rollouts.py     a vLLM engine in a Ray actor: samples, log-probs, new weights
"""
