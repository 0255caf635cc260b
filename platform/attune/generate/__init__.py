"""Batch inference: a registry entry answers a whole JSONL dataset through Ray Data, with vLLM
engines (`ray.data.llm`) or an attune endpoint that is already serving.

    attune generate ~/.attune/registry/tiny-full --data prompts.jsonl --out answers.jsonl
    attune generate ENTRY --data qa.jsonl --out samples.jsonl --samples 4 --temperature 1 \
        --reward contains_answer --pairs pairs.jsonl       # DPO pairs from rewards

config.py  the run's settings          inputs.py  prompts read and checked (file:line)
engines.py vLLM or endpoint processor  run.py     resume, output, summary
pairs.py   rewards -> preference pairs
"""

from attune.generate.config import GenerateConfig
from attune.generate.run import Summary, generate

__all__ = ["GenerateConfig", "Summary", "generate"]
