"""lm-evaluation-harness against a served model: the harness's own runner, over the endpoint's
OpenAI chat API, on attune's question/answer task (built from a JSONL file, so no dataset hub is
needed) or on the harness's standard tasks by name (where the hub is reachable).

    scores = harness_scores("http://127.0.0.1:8000/v1", key, "tiny-full", pairs, ["attune_qa"])
    # {"attune_qa.exact_match": 1.0}
"""

from __future__ import annotations

import json
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from attune.config import ConfigError

LOCAL_TASK = "attune_qa"
# What the harness's results hold beside the scores.
NOT_SCORES = ("alias", "sample_len", "samples")
# Long enough for a busy server to list its models, short next to the harness's retries.
LIST_TIMEOUT_S = 10
# Each answer may run to twice the longest expected answer's words, in tokens, and this many more.
SPARE_TOKENS = 16


def local_task(folder: Path, pairs: list[tuple[str, str]]) -> None:
    """attune_qa in `folder`: each question asked as a chat, its answer scored by exact match."""
    (folder / "qa.jsonl").write_text("".join(
        json.dumps({"question": q, "answer": a}) + "\n" for q, a in pairs))
    longest = max(len(a.split()) for _, a in pairs) * 2 + SPARE_TOKENS
    task = {"task": LOCAL_TASK, "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(folder / "qa.jsonl")}},
            "test_split": "test", "output_type": "generate_until",
            "doc_to_text": "{{question}}", "doc_to_target": "{{answer}}",
            # greedy, to the model's own end of turn, as attune's exact match answers
            "generation_kwargs": {"until": [], "max_gen_toks": longest, "do_sample": False,
                                  "temperature": 0.0},
            "filter_list": [{"name": "strip", "filter": [{"function": "remove_whitespace"},
                                                          {"function": "take_first"}]}],
            "metric_list": [{"metric": "exact_match", "aggregation": "mean",
                             "higher_is_better": True}]}
    (folder / f"{LOCAL_TASK}.yaml").write_text(yaml.safe_dump(task, sort_keys=False))


def check_endpoint(base_url: str, api_key: str, model: str) -> None:
    """Fail in seconds, naming the URL, where `base_url` does not serve `model`: the harness
    retries every request and ends in a traceback long after."""
    if not base_url.startswith(("http://", "https://")):
        raise ConfigError(f"--endpoint {base_url}: expected an http:// or https:// URL ending "
                          "in /v1")
    url = f"{base_url.rstrip('/')}/models"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"})
    try:
        with urllib.request.urlopen(request, timeout=LIST_TIMEOUT_S) as response:
            served = [m["id"] for m in json.load(response)["data"]]
    except urllib.error.HTTPError as e:
        raise ConfigError(f"--endpoint {base_url}: GET {url} answered {e.code} "
                          f"{e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ConfigError(f"--endpoint {base_url}: nothing answers there ({reason})") from None
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"--endpoint {base_url}: GET {url} did not list models as an OpenAI "
                          "endpoint does") from None
    if model not in served:
        raise ConfigError(f"--model {model}: not served at {base_url} (it serves "
                          f"{', '.join(served) or 'nothing'})")


def harness_scores(base_url: str, api_key: str, model: str, pairs: list[tuple[str, str]],
                   tasks: list[str], concurrency: int = 4) -> dict[str, float]:
    """Run `tasks` through the harness against the model `model` at `base_url` (ending in /v1);
    returns '<task>.<metric>' -> value."""
    # the harness imports torch, transformers and datasets: only where it runs
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="attune-harness-") as tmp:
        if LOCAL_TASK in tasks:
            if not pairs:
                raise ConfigError(f"--tasks {LOCAL_TASK}: the data has no question/answer chats")
            local_task(Path(tmp), pairs)
        manager = TaskManager(include_path=tmp)
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            raise ConfigError(f"--tasks: no such lm-evaluation-harness task: {', '.join(unknown)}")
        results = simple_evaluate(
            model="local-chat-completions",
            model_args={"base_url": f"{base_url.rstrip('/')}/chat/completions", "model": model,
                        "tokenizer_backend": "none", "num_concurrent": concurrency,
                        "max_retries": 2, "header": {"Authorization": f"Bearer {api_key}"}},
            tasks=tasks, task_manager=manager, apply_chat_template=True, log_samples=False)
    return _scores(results["results"])


def _scores(results: dict[str, dict]) -> dict[str, float]:
    """The harness's 'exact_match,strip' keys as '<task>.exact_match' (stderrs, counts left out)."""
    scores = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            metric = key.split(",")[0]
            if (metric.endswith("_stderr") or metric in NOT_SCORES
                    or isinstance(value, (str, bool)) or value is None):
                continue
            scores[f"{task}.{metric}"] = float(value)
    return scores
