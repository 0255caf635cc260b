"""attune answers MODEL [--data FILE]: greedy answers to a Q&A file, and their exact match."""

HELP = "greedy answers of a model (entry or directory) on a Q&A file"


def add_arguments(parser) -> None:
    parser.add_argument("model", help="registry entry or model directory")
    parser.add_argument("--data", default="data/transformer_qa.jsonl", help="messages JSONL")


def run(args) -> int:
    from attune.evaluate.greedy_answers import (
        exact_match,
        greedy_answers,
        load_for_generation,
        qa_pairs,
    )

    model, tokenizer = load_for_generation(args.model)
    pairs = qa_pairs(args.data)
    got = greedy_answers(model, tokenizer, [q for q, _ in pairs])
    for (question, expected), answer in zip(pairs, got):
        print(f"{'ok ' if answer == expected else 'BAD'} {question}  ->  {answer}")
    print(f"exact match: {exact_match(got, [a for _, a in pairs]):.1%} of {len(pairs)}")
    return 0
