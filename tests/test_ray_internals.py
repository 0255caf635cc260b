"""attune.ray_internals: each private Ray name attune uses is where Ray keeps it (an upgrade that
moves one fails here, by name), and none loads before it is asked for."""

import subprocess
import sys

import pytest

from attune import ray_internals


def test_every_private_ray_name_is_where_ray_keeps_it():
    missing = []
    for name, (module, attribute) in ray_internals.NAMES.items():
        try:
            getattr(ray_internals, name)
        except (ImportError, AttributeError) as e:
            missing.append(f"{name} ({module}.{attribute or ''}): {e}")
    assert not missing, "\n".join(missing)


def test_a_name_it_does_not_hold_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'OpenAiIngress'"):
        ray_internals.OpenAiIngress  # public: ray.serve.llm.ingress


def test_the_serving_command_loads_no_serve_before_it_runs():
    """`attune serve` sets RAY_SERVE_ENABLE_HA_PROXY before Serve loads (Serve reads it then):
    its modules hold ray_internals, whose names load on first use."""
    code = ("import sys, attune.serve.local, attune.ray_internals; "
            "print([m for m in sys.modules if m.startswith(('ray.serve', 'ray.llm'))])")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout.strip().splitlines()[-1]
    assert loaded == "[]"
