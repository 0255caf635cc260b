"""The bundled chat dataset: short, exact questions and answers on transformer anatomy,
preference pairs over the model questions for DPO (a full sentence preferred to the bare fact),
and the questions as prompts with their answers for GRPO's rewards.

    python -m attune.corpus data/transformer_qa.jsonl data/transformer_qa_preferences.jsonl \
        data/transformer_qa_prompts.jsonl

Deterministic: the same code writes the same bytes, so the file in the repo can be checked
against it. Answers are short and exact so that a test can tell what a model learned.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# name: (family, layers, hidden size, attention heads, made by)
MODELS = {
    "BERT-base": ("encoder-only", 12, 768, 12, "Google"),
    "BERT-large": ("encoder-only", 24, 1024, 16, "Google"),
    "RoBERTa-base": ("encoder-only", 12, 768, 12, "Meta"),
    "DistilBERT": ("encoder-only", 6, 768, 12, "Hugging Face"),
    "ALBERT-base": ("encoder-only", 12, 768, 12, "Google"),
    "ELECTRA-small": ("encoder-only", 12, 256, 4, "Google"),
    "GPT-2 small": ("decoder-only", 12, 768, 12, "OpenAI"),
    "GPT-2 medium": ("decoder-only", 24, 1024, 16, "OpenAI"),
    "GPT-2 large": ("decoder-only", 36, 1280, 20, "OpenAI"),
    "GPT-2 XL": ("decoder-only", 48, 1600, 25, "OpenAI"),
    "GPT-3": ("decoder-only", 96, 12288, 96, "OpenAI"),
    "Llama 2 7B": ("decoder-only", 32, 4096, 32, "Meta"),
    "Llama 2 13B": ("decoder-only", 40, 5120, 40, "Meta"),
    "Llama 2 70B": ("decoder-only", 80, 8192, 64, "Meta"),
    "Llama 3 8B": ("decoder-only", 32, 4096, 32, "Meta"),
    "Mistral 7B": ("decoder-only", 32, 4096, 32, "Mistral AI"),
    "Falcon 7B": ("decoder-only", 32, 4544, 71, "TII"),
    "T5-small": ("encoder-decoder", 6, 512, 8, "Google"),
    "T5-base": ("encoder-decoder", 12, 768, 12, "Google"),
    "T5-large": ("encoder-decoder", 24, 1024, 16, "Google"),
    "BART-base": ("encoder-decoder", 6, 768, 12, "Meta"),
    "BART-large": ("encoder-decoder", 12, 1024, 16, "Meta"),
}

CONCEPTS = [
    ("What are the three transformer families?", "Encoder-only, decoder-only and encoder-decoder."),
    ("Which family is best suited to text classification?", "Encoder-only."),
    ("Which family generates text one token at a time?", "Decoder-only."),
    ("Which family is used for translation in the original transformer?", "Encoder-decoder."),
    ("What kind of attention mask does a decoder use?", "A causal mask."),
    ("What kind of attention does an encoder use?", "Bidirectional self-attention."),
    ("What does cross-attention attend to?", "The encoder outputs."),
    ("What does an embedding layer map?", "Token ids to vectors."),
    ("What gives a transformer the order of its tokens?", "Positional encodings."),
    ("What positional encoding does Llama use?", "Rotary embeddings (RoPE)."),
    ("What positional encoding did the original transformer use?", "Sinusoidal encodings."),
    ("What positional encoding does BERT use?", "Learned absolute positions."),
    ("What are tied embeddings?", "Input embeddings shared with the output layer."),
    ("What are the three projections of attention?", "Queries, keys and values."),
    ("What is attention's formula?", "softmax(QK^T / sqrt(d)) V."),
    ("Why divide attention scores by sqrt(d)?", "To keep the softmax from saturating."),
    ("What does the softmax in attention normalize over?", "The keys."),
    ("What is the cost of self-attention in sequence length?", "Quadratic."),
    ("What does multi-head attention split?", "The hidden size into heads."),
    ("What joins the heads after multi-head attention?", "An output projection."),
    ("What is grouped-query attention?", "Several query heads sharing one key-value head."),
    ("What is multi-query attention?", "All query heads sharing one key-value head."),
    ("What does the KV cache store?", "Past keys and values."),
    ("What does FlashAttention avoid materializing?", "The full attention matrix."),
    ("What does a feed-forward block apply to each token?", "Two linear layers with an activation."),
    ("What activation does Llama's feed-forward block use?", "SwiGLU."),
    ("What activation does BERT's feed-forward block use?", "GELU."),
    ("What is the usual feed-forward expansion factor?", "4."),
    ("What normalization does Llama use?", "RMSNorm."),
    ("What normalization does BERT use?", "LayerNorm."),
    ("Where does a pre-norm transformer normalize?", "Before each sublayer."),
    ("What carries the input around each sublayer?", "A residual connection."),
    ("What objective trains BERT?", "Masked language modeling."),
    ("What objective trains GPT?", "Next-token prediction."),
    ("What objective trains T5?", "Span corruption."),
    ("What is fine-tuning?", "Further training of a pretrained model."),
    ("What does LoRA train?", "Low-rank adapter matrices."),
    ("What does LoRA freeze?", "The base model weights."),
    ("What scales a LoRA update?", "alpha divided by rank."),
    ("What is QLoRA?", "LoRA on a 4-bit quantized base model."),
    ("What is instruction tuning?", "Fine-tuning on instructions and answers."),
    ("What loss does causal language model fine-tuning use?", "Cross-entropy."),
    ("Which tokens carry the loss in chat fine-tuning?", "The assistant tokens."),
    ("What is sequence packing?", "Several samples in one sequence."),
    ("What does DDP replicate on every GPU?", "The full model."),
    ("What does DDP average across GPUs?", "The gradients."),
    ("What collective does DDP use for gradients?", "All-reduce."),
    ("What does FSDP shard across GPUs?", "Parameters, gradients and optimizer states."),
    ("What collective gathers FSDP parameters?", "All-gather."),
    ("What collective scatters FSDP gradients?", "Reduce-scatter."),
    ("What is ZeRO stage 3 equivalent to?", "Full sharding, like FSDP."),
    ("What is tensor parallelism?", "Splitting each layer's matrices across GPUs."),
    ("What is pipeline parallelism?", "Splitting the layers into stages across GPUs."),
    ("What does gradient accumulation simulate?", "A larger batch."),
    ("What does activation checkpointing trade?", "Compute for memory."),
    ("What precision do modern GPUs train in?", "bfloat16."),
    ("What library runs distributed training on Ray?", "Ray Train."),
    ("What library searches hyperparameters on Ray?", "Ray Tune."),
    ("What scheduler stops bad trials early in Ray Tune?", "ASHA."),
    ("What library serves models on Ray?", "Ray Serve."),
    ("What engine serves LLMs with paged attention?", "vLLM."),
    ("What does MFU stand for?", "Model FLOPs utilization."),
    ("How many FLOPs per token does training take?", "About 6 times the parameter count."),
]


def _model_facts() -> list[tuple[str, str, str]]:
    """(question, short answer, the same answer as a full sentence) for every model."""
    facts = []
    for name, (family, layers, hidden, heads, maker) in MODELS.items():
        facts += [
            (f"Which family does {name} belong to?", f"{family.capitalize()}.",
             f"{name} is {family}."),
            (f"How many layers does {name} have?", f"{layers}.", f"{name} has {layers} layers."),
            (f"What is the hidden size of {name}?", f"{hidden}.",
             f"{name} has a hidden size of {hidden}."),
            (f"How many attention heads does {name} have?", f"{heads}.",
             f"{name} has {heads} attention heads."),
            (f"What is the head dimension of {name}?", f"{hidden // heads}.",
             f"{name} has a head dimension of {hidden // heads}."),
            (f"Who released {name}?", f"{maker}.", f"{maker} released {name}."),
        ]
    return facts


def _model_questions() -> list[tuple[str, str]]:
    return [(question, short) for question, short, _ in _model_facts()]


def _arithmetic_questions() -> list[tuple[str, str]]:
    pairs = []
    for hidden in (256, 512, 1024, 2048, 4096):
        for heads in (4, 8, 16, 32):
            pairs.append((f"With hidden size {hidden} and {heads} heads, what is the head "
                          f"dimension?", f"{hidden // heads}."))
        pairs.append((f"What is the feed-forward size for hidden size {hidden} with expansion 4?",
                      f"{4 * hidden}."))
    for gpus in (2, 4, 8):
        for batch in (4, 8, 16):
            pairs.append((f"With {gpus} GPUs and micro-batch {batch}, what is the global batch?",
                          f"{gpus * batch}."))
    return pairs


def examples() -> list[dict]:
    """Every example, in a fixed order, as OpenAI chat `messages` records."""
    pairs = _model_questions() + CONCEPTS + _arithmetic_questions()
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in pairs]


def preference_pairs() -> list[dict]:
    """DPO pairs in the common preference format: a full sentence chosen over the bare fact."""
    return [{"prompt": question, "chosen": sentence, "rejected": short}
            for question, short, sentence in _model_facts()]


def prompts() -> list[dict]:
    """Every question as a GRPO prompt, its answer (without the full stop) a field for rewards."""
    return [{"prompt": e["messages"][0]["content"], "answer": e["messages"][1]["content"].rstrip(".")}
            for e in examples()]


def write(path: str | Path, lines: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in lines))
    return path


if __name__ == "__main__":
    chats, pairs, questions = (sys.argv[1:] + [None, None, None])[:3]
    print(f"wrote {len(examples())} examples to "
          f"{write(chats or 'data/transformer_qa.jsonl', examples())}")
    print(f"wrote {len(preference_pairs())} preference pairs to "
          f"{write(pairs or 'data/transformer_qa_preferences.jsonl', preference_pairs())}")
    print(f"wrote {len(prompts())} prompts to "
          f"{write(questions or 'data/transformer_qa_prompts.jsonl', prompts())}")
