"""Chat templates: the loss mask of each family, what vLLM renders against what training did, and
a user's template whose end of turn becomes where vLLM stops.

    pytest tests/test_chat_templates.py
"""

from __future__ import annotations

import json
import shutil

import pytest

from attune import chat_templates, modeling, registry
from attune.config import ConfigError
from attune.tiny_models import TINY_MODELS
from attune.train.tokenizing import IGNORE, tokenize_chat

CHAT = [{"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "What is 3 * 4?"},
        {"role": "assistant", "content": "12."},
        {"role": "user", "content": "Who wrote it?"},
        {"role": "assistant", "content": "Google."}]
END = {"attune:tiny-llama": "</s>", "attune:tiny-qwen2": "<|im_end|>",
       "attune:tiny-llama3": "<|eot_id|>"}


def labelled_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    runs, run = [], []
    for i, label in zip(ids, labels):
        if label != IGNORE:
            assert label == i
            run.append(i)
        elif run:
            runs, run = runs + [run], []
    return runs + [run] if run else runs


def tokenizer_of(name: str, chat_template: str | None = None):
    return modeling.load_tokenizer(modeling.resolve(name), chat_template)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_labels_are_each_answer_and_its_end_of_turn(attune_home, name):
    tokenizer = tokenizer_of(name)
    assert chat_templates.end_of_turn(tokenizer) == END[name] == tokenizer.eos_token
    ids, labels = tokenize_chat(CHAT, tokenizer)
    runs = labelled_runs(ids, labels)
    # nothing of the prompt, the roles or what the template writes after the end of turn
    assert [tokenizer.decode(run) for run in runs] == [f"12.{END[name]}", f"Google.{END[name]}"]
    assert all(run[-1] == tokenizer.convert_tokens_to_ids(END[name]) for run in runs)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_each_tiny_model_has_its_family_shape(attune_home, name):
    config = modeling.model_config(name)
    tokenizer = tokenizer_of(name)
    assert config.hidden_size // config.num_attention_heads == 64  # vLLM's CPU attention
    assert config.vocab_size > len(tokenizer)  # spare rows for a user template's end of turn
    if name == "attune:tiny-qwen2":
        assert config.model_type == "qwen2" and config.tie_word_embeddings
        assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    if name == "attune:tiny-llama3":
        assert config.model_type == "llama" and not config.tie_word_embeddings
        assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)


def test_a_user_chatml_template_on_tiny_llama_ends_turns_where_vllm_stops(attune_home, tmp_path):
    """vLLM's own code reads the entry: its tokenizer's eos, the generation config's list and the
    stop ids of a request's sampling parameters all hold <|im_end|>."""
    from vllm import SamplingParams
    from vllm.config import ModelConfig
    from vllm.tokenizers import get_tokenizer

    base = modeling.resolve("attune:tiny-llama")
    tokenizer = tokenizer_of("attune:tiny-llama", chat_templates.CHATML)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.encode("<|im_end|>", add_special_tokens=False) == [im_end]
    assert im_end < modeling.model_config(base).vocab_size  # one of the model's spare rows
    ids, labels = tokenize_chat(CHAT, tokenizer)
    assert [run[-1] for run in labelled_runs(ids, labels)] == [im_end, im_end]

    entry = tmp_path / "entry"  # a full fine-tune's entry as the registry writes it
    shutil.copytree(base, entry)
    tokenizer.save_pretrained(entry)
    registry._stop_at_end_of_turn(entry, tokenizer)
    assert json.loads((entry / "generation_config.json").read_text())["eos_token_id"] == [im_end, 2]

    served = get_tokenizer(str(entry))
    assert served.eos_token_id == im_end
    generation = ModelConfig(model=str(entry), tokenizer=str(entry)).try_get_generation_config()
    params = SamplingParams(max_tokens=8)
    params.update_from_generation_config(generation, served.eos_token_id)
    assert {im_end, 2} <= params.all_stop_token_ids


def test_vllm_renders_a_chat_as_training_does(attune_home):
    """The prompt vLLM builds for a chat request (its own chat-template code) is, token for token,
    the prompt a trained assistant turn followed."""
    from vllm.config import ModelConfig
    from vllm.renderers.hf import safe_apply_chat_template
    from vllm.tokenizers import get_tokenizer

    for name in TINY_MODELS:
        path = modeling.resolve(name)
        ids, labels = tokenize_chat(CHAT[:3], tokenizer_of(name))
        prompt = ids[:next(i for i, label in enumerate(labels) if label != IGNORE)]
        served = safe_apply_chat_template(ModelConfig(model=path, tokenizer=path),
                                          get_tokenizer(path), CHAT[:2], add_generation_prompt=True)
        assert served == prompt, name


def test_a_template_that_ends_no_turn_is_refused(attune_home):
    with pytest.raises(ConfigError, match="puts nothing after an assistant's words"):
        tokenizer_of("attune:tiny-llama", "{% for m in messages %}{{ m['content'] }}{% endfor %}")


def test_an_end_of_turn_without_a_spare_row_is_refused_with_what_to_do(attune_home):
    tokenizer = tokenizer_of("attune:tiny-llama")
    tokenizer.chat_template = chat_templates.CHATML
    with pytest.raises(ConfigError) as e:
        chat_templates.register_end_of_turn(tokenizer, embedding_rows=len(tokenizer))
    assert str(e.value).startswith("data.chat_template: ends assistant turns with '<|im_end|>'")
    assert "'</s>'" in str(e.value) and "no spare embedding row" in str(e.value)


def test_an_unknown_attune_model_names_the_ones_there_are(attune_home):
    with pytest.raises(ConfigError, match="attune:tiny-llama, attune:tiny-qwen2, attune:tiny-llama3"):
        modeling.resolve("attune:tiny-gpt")
