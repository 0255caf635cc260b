"""The cpu image, built here from the Dockerfile, runs attune: its command, run-time compilation,
NVIDIA's libraries where GKE mounts them, a 10-step fine-tune, and `attune serve` answering a
chat message from a real vLLM engine.

    pytest --image tests/test_image.py     # or `make test-image`; without --image, deselected

The build comes first (tests/podman_image.py; a cache hit when nothing changed, many minutes
when the dependencies did: bench/README.md, The image). Every command runs inside the image as
its user, with the network of a pod that has no egress: loopback only.
"""

from __future__ import annotations

import re

import pytest
from podman_image import build, container

pytestmark = pytest.mark.image

FINE_TUNE = ["attune", "train", "recipes/tiny-full.yaml", "optim.max_steps=10",
             "optim.warmup_steps=1", "scaling.num_workers=1", "eval.every_steps=10",
             "checkpoint.every_steps=10"]

# `attune serve` in the background until it says where it serves; one chat message through the
# OpenAI client; then Ctrl-C, as a user stops it (job control on: a background job of a script
# ignores SIGINT otherwise). The C++ kernels vLLM's engines built on the way are counted.
SERVE_AND_ASK = """
set -em
touch /tmp/before-serve
attune serve recipes/tiny-full.yaml --port 8000 > /tmp/serve.log 2>&1 &
serving=$!
until grep -q "serving at" /tmp/serve.log; do
    kill -0 $serving 2>/dev/null || { cat /tmp/serve.log; exit 1; }
    sleep 2
done
python -c '
from openai import OpenAI
client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="smoke-key")
reply = client.chat.completions.create(
    model="tiny-full", messages=[{"role": "user", "content": "What is attention?"}], max_tokens=16)
print("completion tokens:", reply.usage.completion_tokens)
print("answer:", repr(reply.choices[0].message.content))
'
kill -INT $serving
wait $serving
cat /tmp/serve.log
echo "kernels built: $(find /tmp /home/ray -name '*.so' -newer /tmp/before-serve | wc -l)"
"""


def check(done) -> str:
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    return output


@pytest.fixture(scope="module")
def box():
    with container(build("cpu")) as box:
        yield box


@pytest.fixture(scope="module")
def fine_tuned(box) -> str:
    """The output of a 10-step fine-tune of the tiny model (built first) in the image."""
    return check(box.run(FINE_TUNE, timeout=1200))


def test_attune_help(box):
    output = check(box.run(["attune", "--help"]))
    assert "train" in output and "serve" in output


def test_torch_compile_builds_its_kernels(box):
    """What vLLM's CPU backend does to the model at start: inductor writes C++ and builds it
    with the image's compiler against Python's headers."""
    code = ("import torch; f = torch.compile(lambda x: x.sin() + 1); "
            "print(f(torch.zeros(4)).tolist())")
    output = check(box.run(["python", "-c", code]))
    assert "[1.0, 1.0, 1.0, 1.0]" in output


def test_finds_nvidia_libraries_where_gke_mounts_them(box, tmp_path):
    """GKE mounts the node's driver libraries at /usr/local/nvidia/lib64; torch and Ray load
    libcuda.so.1 and libnvidia-ml.so.1 by name, so the image's library path must have it."""
    tmp_path.chmod(0o777)
    stub = ("printf 'int cuInit(unsigned int flags) { return 0; }' | "
            "gcc -shared -fPIC -x c -o /usr/local/nvidia/lib64/libcuda.so.1 - && "
            "python -c 'import ctypes; print(ctypes.CDLL(\"libcuda.so.1\").cuInit(0))'")
    output = check(box.run(["sh", "-c", stub], binds={str(tmp_path): "/usr/local/nvidia/lib64"}))
    assert output.strip() == "0"


def test_a_10_step_fine_tune(fine_tuned):
    assert "[attune] step 10/10 |" in fine_tuned, fine_tuned[-3000:]
    assert "[attune] registry entry: /home/ray/.attune/registry/tiny-full" in fine_tuned


def test_attune_serve_answers_a_chat_message(box, fine_tuned):
    output = check(box.run(["bash", "-c", SERVE_AND_ASK], env={"ATTUNE_API_KEYS": "smoke-key"},
                           timeout=1200))
    assert "[attune]   model: tiny-full" in output
    assert int(re.search(r"completion tokens: (\d+)", output)[1]) > 0, output[-3000:]
    assert "[attune] shutting down" in output
    # vLLM's CPU backend compiled the model: the image's compiler was needed, and there
    assert int(re.search(r"kernels built: (\d+)", output)[1]) > 0
