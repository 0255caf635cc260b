"""Evaluation: a registry entry's scores, measured in plain transformers or through a served
endpoint, and recorded in its manifest (the promotion gate that reads them is serving's:
attune.serve.promotion_gate).

    attune eval ~/.attune/registry/tiny-full --data data/transformer_qa.jsonl

scores.py           what `attune eval` computes and records: eval loss, exact match, the
                    harness's tasks, into the entry's manifest and its MLflow run
greedy_answers.py   a model (entry or directory) loaded for generation, its greedy answers to
                    the bundled questions, and their exact match (`attune answers`, the demo)
lm_eval_harness.py  lm-evaluation-harness against a served entry (attune_qa from a JSONL,
                    standard tasks by name)
"""
