"""The settings of one `attune generate` run: the entry, the data, sampling, engines, rewards."""

from __future__ import annotations

from pydantic import Field

from attune.config import ConfigError, StrictConfig
from attune.serve.config import EngineConfig
from attune.train.rewards import RewardConfig


class GenerateConfig(StrictConfig):
    entry: str = Field(description="Registry entry (full or LoRA) whose model answers; with an "
                       "endpoint engine, its name is the model id asked for.")
    data: str = Field(description="JSONL input: each line a 'messages' chat or a 'prompt' string, "
                      "with any other fields (kept in the output).")
    out: str = Field(description="JSONL output: each input line's fields plus id, answer, "
                     "finish_reason, prompt_tokens, completion_tokens (and sample with samples > 1).")
    temperature: float = Field(0.0, ge=0, description="Sampling temperature; 0 is greedy.")
    max_tokens: int = Field(64, ge=1, description="Most tokens per answer.")
    seed: int = Field(0, description="Seed of sampling; sample k of a line uses seed + k.")
    samples: int = Field(1, ge=1, description="Answers per line (each with its own seed).")
    skip_bad_lines: bool = Field(False, description="Report bad input lines and go on, instead "
                                 "of stopping at the first.")
    endpoint: str | None = Field(None, description="An attune endpoint's base URL (ends in /v1) "
                                 "to send requests to, instead of starting vLLM engines.")
    api_key: str = Field("none", description="Bearer key for the endpoint.")
    model: str | None = Field(None, description="The model id at the endpoint (default: the "
                              "entry's name).")
    engines: int = Field(1, ge=1, description="vLLM engines (or concurrent HTTP clients) in parallel.")
    batch_size: int = Field(32, ge=1, description="Rows per batch sent to an engine.")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="vLLM engine settings, "
                                 "as for serving (the same defaults, so answers match the endpoint's).")
    rewards: list[RewardConfig] = Field(default_factory=list, description="Rewards that rank each "
                                        "line's samples; the best and worst become a DPO pair.")
    pairs: str | None = Field(None, description="JSONL output of the pairs (data.format: "
                              "preference); needs rewards and samples >= 2.")

    def check(self) -> None:
        """The cross-field rules, as one line each."""
        if bool(self.rewards) != bool(self.pairs):
            raise ConfigError("--reward and --pairs go together: rewards rank the samples, pairs "
                              "is where the best and worst go")
        if self.rewards and self.samples < 2:
            raise ConfigError("--reward needs --samples 2 or more: a pair is two answers")
