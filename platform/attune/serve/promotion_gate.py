"""The promotion gate: `attune promote --require 'SCORE OP N'` refuses an entry whose scores miss
a bound, before anything is touched. The scores are those `attune eval` wrote into the entry's
manifest (attune.evaluate.scores); the gate only reads them.

    check_requirements(read_manifest(entry), ["exact_match>=0.9", "eval_loss<=0.05"])
"""

from __future__ import annotations

import operator
import re

from attune.config import ConfigError

COMPARISONS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt,
               "==": operator.eq}
REQUIREMENT = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.]*)\s*(>=|<=|==|>|<)\s*(-?[0-9.]+(?:e-?[0-9]+)?)\s*$")


def parse_requirement(text: str) -> tuple[str, str, float]:
    """'exact_match>=0.9' -> ('exact_match', '>=', 0.9)."""
    match = REQUIREMENT.match(text)
    if not match:
        raise ConfigError(f"--require {text!r}: expected SCORE OP NUMBER, e.g. 'exact_match>=0.9' "
                          f"(OP one of {', '.join(COMPARISONS)})")
    name, op, value = match.groups()
    return name, op, float(value)


def check_requirements(manifest: dict, requirements: list[str]) -> None:
    """Raise ConfigError, with the entry's scores, unless every requirement holds."""
    parsed = [parse_requirement(r) for r in requirements]  # every one well-formed before any check
    if not parsed:
        return
    scores = (manifest.get("eval") or {}).get("scores")
    if scores is None:
        raise ConfigError(f"{manifest['name']} has no evaluation scores; run `attune eval` on it "
                          "first")
    failed = []
    for name, op, value in parsed:
        if name not in scores:
            raise ConfigError(f"--require {name}: no such score (the entry has "
                              f"{', '.join(sorted(scores))})")
        if not COMPARISONS[op](scores[name], value):
            failed.append(f"{name} {scores[name]:.4g} (needs {op} {value:g})")
    if failed:
        shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(scores.items()))
        raise ConfigError(f"not promoting {manifest['name']}: {'; '.join(failed)}. Its scores "
                          f"on {manifest['eval']['data']}: {shown}")
