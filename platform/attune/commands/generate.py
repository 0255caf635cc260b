"""attune generate ENTRY --data FILE --out FILE: answer every line of a JSONL dataset with a
registry entry (full or LoRA) through Ray Data: vLLM engines, or an endpoint already serving.

    attune generate ~/.attune/registry/tiny-full --data data/transformer_qa.jsonl --out answers.jsonl
    attune generate ENTRY --data prompts.jsonl --out answers.jsonl --engine endpoint http://127.0.0.1:8000/v1
    attune generate ENTRY --data qa.jsonl --out samples.jsonl --samples 4 --temperature 1 \
        --reward contains_answer --pairs pairs.jsonl

Each output line is the input line's fields plus id, completion, finish_reason, prompt_tokens and
completion_tokens. Run it again after a failure: answered lines are not asked again.
"""

import os

HELP = "answer a JSONL dataset with a registry entry (Ray Data + vLLM), resumable"


def add_arguments(parser) -> None:
    parser.add_argument("entry", help="registry entry location (a local path)")
    parser.add_argument("--data", required=True, help="JSONL: each line 'messages' or 'prompt'")
    parser.add_argument("--out", required=True, help="JSONL answers (appended to; resumes)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    parser.add_argument("--max-tokens", type=int, default=64, help="most tokens per answer")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (sample k: seed + k)")
    parser.add_argument("--samples", type=int, default=1, help="answers per line")
    parser.add_argument("--skip-bad-lines", action="store_true",
                        help="report bad lines (file:line) and go on instead of stopping")
    parser.add_argument("--engine", nargs="+", default=["vllm"], metavar="vllm | endpoint URL",
                        help="vllm (default): start vLLM engines; endpoint URL: an attune "
                        "endpoint already serving the entry (URL ends in /v1)")
    parser.add_argument("--engines", type=int, default=1, help="engines (or HTTP clients) at once")
    parser.add_argument("--model", default=None,
                        help="the entry's model id at the endpoint (default: the entry's name)")
    parser.add_argument("--api-key", default=os.environ.get("ATTUNE_API_KEY", "none"),
                        help="bearer key for the endpoint (default: $ATTUNE_API_KEY)")
    parser.add_argument("--reward", action="append", default=[], metavar="FUNCTION",
                        help="a reward (built-in or module:function) ranking each line's samples")
    parser.add_argument("--pairs", default=None,
                        help="JSONL of DPO pairs (best and worst sample by the rewards)")


def run(args) -> int:
    from attune.config import ConfigError, validate
    from attune.generate import GenerateConfig, generate

    endpoint = None
    if args.engine[0] == "endpoint" and len(args.engine) == 2:
        endpoint = args.engine[1]
    elif args.engine != ["vllm"]:
        raise ConfigError(f"--engine {' '.join(args.engine)}: expected 'vllm' or 'endpoint URL'")
    config = validate(GenerateConfig, dict(
        entry=args.entry, data=args.data, out=args.out, temperature=args.temperature,
        max_tokens=args.max_tokens, seed=args.seed, samples=args.samples,
        skip_bad_lines=args.skip_bad_lines, endpoint=endpoint, api_key=args.api_key,
        model=args.model, engines=args.engines, pairs=args.pairs,
        rewards=[{"function": name} for name in args.reward]), "attune generate")
    summary = generate(config)
    print(f"[attune] {args.out}: {summary.line()}", flush=True)
    return 0
