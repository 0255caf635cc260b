"""One `attune generate` run: read the prompts, skip those answered already, answer the rest
through Ray Data, append each answer to the output as it comes, and make pairs if asked.

    summary = generate(GenerateConfig(entry=..., data="prompts.jsonl", out="answers.jsonl"))

The output is appended to line by line, so a run that dies keeps what it answered; the next run
drops a half-written last line and any line whose samples are incomplete, and answers only the
rest.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import ray

from attune import modeling
from attune.cluster import ensure_ray
from attune.generate.config import GenerateConfig
from attune.generate.engines import Model, endpoint_processor, vllm_processor
from attune.generate.inputs import read_prompts
from attune.generate.pairs import write_pairs
from attune.registry import check_local_model, read_manifest


@dataclass(frozen=True)
class Summary:
    answered: int  # rows answered by this run (lines x samples)
    resumed: int  # lines the output held already
    bad_lines: list[str]  # "file:line: why", skipped
    completion_tokens: int
    seconds: float
    pairs: int | None  # pairs written, with rewards

    def line(self) -> str:
        rate = f"{self.answered / self.seconds:.1f} rows/s, " \
               f"{self.completion_tokens / self.seconds:.0f} tokens/s" if self.seconds else "-"
        extra = f", {self.pairs} pairs" if self.pairs is not None else ""
        return (f"{self.answered} answers in {self.seconds:.1f} s ({rate}); {self.resumed} lines "
                f"answered before, {len(self.bad_lines)} bad lines skipped{extra}")


def generate(config: GenerateConfig) -> Summary:
    config.check()
    rows, bad = read_prompts(config.data, config.skip_bad_lines)
    for report in bad:
        print(f"[attune] skipped {report}", flush=True)
    done = _finished(Path(config.out), config.samples)
    todo = [dict(row, sample=k) for row in rows if row["id"] not in done
            for k in range(config.samples)]
    start, tokens = time.perf_counter(), 0
    if todo:
        processor = _processor(config)
        Path(config.out).parent.mkdir(parents=True, exist_ok=True)
        with open(config.out, "a") as out:
            for row in processor(ray.data.from_items(todo)).iter_rows():
                out.write(json.dumps(_output(row, config.samples)) + "\n")
                out.flush()  # a run that dies keeps every answer written
                tokens += row["completion_tokens"]
    seconds = time.perf_counter() - start
    pairs = write_pairs(config, rows) if config.rewards else None
    return Summary(len(todo), len(done), bad, tokens, seconds, pairs)


def entry_model(location: str) -> Model:
    """The engine's view of a local registry entry: a full fine-tune's weights, or a LoRA
    adapter on its base model."""
    manifest = read_manifest(location)
    check_local_model(location)
    path = Path(location).expanduser().resolve()
    lora = manifest["method"] == "lora"
    weights = Path(modeling.resolve(manifest["base_model"])) if lora else path
    generation = next((p / "generation_config.json" for p in (path, weights)
                       if (p / "generation_config.json").is_file()), None)
    stops = json.loads(generation.read_text()).get("eos_token_id", []) if generation else []
    return Model(str(weights), str(path), str(path) if lora else None,
                 tuple(stops if isinstance(stops, list) else [stops]),
                 manifest["lora"]["rank"] if lora else 0)


def _processor(config: GenerateConfig):
    ensure_ray(num_cpus=config.engines + 3)  # engines, the prompt stage, map tasks
    if config.endpoint:
        return endpoint_processor(config, config.model or read_manifest(config.entry)["name"])
    return vllm_processor(config, entry_model(config.entry))


def _output(row: dict, samples: int) -> dict:
    line = json.loads(row["line"])
    out = {"id": row["id"]} | line if "id" not in line else line
    out |= {"completion": row["answer"], "finish_reason": row["finish_reason"],
            "prompt_tokens": row["prompt_tokens"], "completion_tokens": row["completion_tokens"]}
    if samples > 1:
        out["sample"] = row["sample"]
    return out


def _finished(out: Path, samples: int) -> set[str]:
    """Ids whose every sample the output holds; the file is rewritten without a half-written last
    line and without lines of unfinished ids, which this run answers again."""
    if not out.is_file():
        return set()
    lines = []
    for raw in out.read_text().splitlines():
        try:
            lines.append(json.loads(raw))
        except json.JSONDecodeError:  # the last line of a run that died while writing it
            continue
    counts: dict[str, int] = {}
    for line in lines:
        counts[str(line["id"])] = counts.get(str(line["id"]), 0) + 1
    done = {key for key, n in counts.items() if n >= samples}
    kept = [line for line in lines if str(line["id"]) in done]
    text = "".join(json.dumps(line) + "\n" for line in kept)
    if text != out.read_text():
        out.write_text(text)
    return done
