"""The answering stage, as a `ray.data.llm` processor: vLLM engines in Ray Data actors, or HTTP
requests to an attune endpoint that is already serving.

    processor = vllm_processor(config, model)        # rows {messages, sample} -> + answer, ...
    processor = endpoint_processor(config, model_id)

Either way a row gets `answer`, `finish_reason`, `prompt_tokens` and `completion_tokens`.
"""

from __future__ import annotations

from dataclasses import dataclass

import ray
from ray.data.llm import HttpRequestProcessorConfig, build_processor, vLLMEngineProcessorConfig

from attune.generate.config import GenerateConfig
from attune.serve.llm_config import CPU_COMPILE_ENV

# Columns the answering stage adds; the run writes them beside the input line's fields.
ANSWER_COLUMNS = ("answer", "finish_reason", "prompt_tokens", "completion_tokens")


@dataclass(frozen=True)
class Model:
    """What the engines load: the weights, the tokenizer with the entry's chat template, and for a
    LoRA entry the adapter applied on top."""
    weights: str  # the full fine-tune's directory, or the LoRA entry's base model
    tokenizer: str  # the entry's directory: its tokenizer carries the chat template
    adapter: str | None
    stop_ids: tuple[int, ...]  # where answers end (generation_config.json's eos_token_id)
    lora_rank: int = 0


def vllm_processor(config: GenerateConfig, model: Model):
    """vLLM engines, one per Ray Data actor; the prompt is templated and tokenized as the
    endpoint's chat API does (no special tokens added), so greedy answers match it."""
    e = config.engine
    engine_kwargs = {"dtype": e.dtype, "max_model_len": e.max_model_len,
                     "max_num_seqs": e.max_num_seqs, "enable_prefix_caching": e.enable_prefix_caching,
                     "generation_config": "auto", **e.extra}
    if model.adapter:
        engine_kwargs |= {"enable_lora": True, "max_lora_rank": max(e.max_lora_rank, model.lora_rank),
                          "max_loras": 1}
    processor_config = vLLMEngineProcessorConfig(
        model_source=model.weights,
        engine_kwargs=engine_kwargs,
        runtime_env={"env_vars": {**CPU_COMPILE_ENV, "VLLM_CPU_KVCACHE_SPACE": str(e.cpu_kvcache_gib)}},
        # one CPU bundle per engine: without it each engine actor asks Ray for a GPU
        placement_group_config={"bundles": [{"CPU": 1}]},
        concurrency=config.engines,
        batch_size=config.batch_size,
        # attune templates and tokenizes in its own stage (_Prompts): Ray's tokenizer stage adds
        # the BOS token, which the endpoint's chat API does not
        chat_template_stage=False, tokenize_stage=False, detokenize_stage=False,
        log_engine_metrics=False,
    )
    settings = _sampling(config)
    stops = set(model.stop_ids)

    def preprocess(row: dict) -> dict:
        params = dict(settings, seed=config.seed + int(row["sample"]))
        extra = {"model": model.adapter} if model.adapter else {}
        return dict(row, sampling_params=params, **extra)

    def postprocess(row: dict) -> dict:
        tokens = list(row["generated_tokens"])
        stopped = bool(tokens) and tokens[-1] in stops or len(tokens) < config.max_tokens
        return _keep(row) | {"answer": row["generated_text"],
                             "finish_reason": "stop" if stopped else "length",
                             "prompt_tokens": int(row["num_input_tokens"]),
                             "completion_tokens": int(row["num_generated_tokens"])}

    processor = build_processor(processor_config, preprocess=preprocess, postprocess=postprocess)
    prompts = ray.data.ActorPoolStrategy(size=1)
    return lambda ds: processor(ds.map_batches(_Prompts, fn_constructor_args=(model.tokenizer,),
                                               compute=prompts, batch_size=config.batch_size))


def endpoint_processor(config: GenerateConfig, model_id: str):
    """OpenAI chat requests to a serving endpoint, `engines` clients at a time."""
    processor_config = HttpRequestProcessorConfig(
        url=f"{config.endpoint.rstrip('/')}/chat/completions",
        headers={"Authorization": f"Bearer {config.api_key}"},
        concurrency=config.engines, batch_size=config.batch_size)
    settings = _sampling(config)

    def preprocess(row: dict) -> dict:
        payload = dict(settings, model=model_id, messages=list(row["messages"]),
                       seed=config.seed + int(row["sample"]))
        return dict(row, payload=payload)

    def postprocess(row: dict) -> dict:
        response = row["http_response"]
        choice = response["choices"][0]
        return _keep(row) | {"answer": choice["message"]["content"] or "",
                             "finish_reason": choice["finish_reason"],
                             "prompt_tokens": int(response["usage"]["prompt_tokens"]),
                             "completion_tokens": int(response["usage"]["completion_tokens"])}

    return build_processor(processor_config, preprocess=preprocess, postprocess=postprocess)


class _Prompts:
    """A Ray Data stage: the chat template applied to each row's messages, then tokenized."""

    def __init__(self, tokenizer_path: str):
        from transformers import AutoTokenizer  # in the stage's worker only

        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)

    def __call__(self, batch: dict) -> dict:
        texts = [self.tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=False,
                                                    add_generation_prompt=True)
                 for messages in batch["messages"]]
        batch["prompt"] = texts
        batch["tokenized_prompt"] = [self.tokenizer(t, add_special_tokens=False)["input_ids"]
                                     for t in texts]
        return batch


def _sampling(config: GenerateConfig) -> dict:
    return {"temperature": config.temperature, "max_tokens": config.max_tokens}


def _keep(row: dict) -> dict:
    """The columns the run reads back: the line's id, text and sample."""
    return {"id": row["id"], "line": row["line"], "sample": int(row["sample"]),
            "source": row["source"]}
