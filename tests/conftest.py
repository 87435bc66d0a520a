"""Test-wide settings. Triton runs through its interpreter on CPU; this must be set before triton is imported.

Marker `gpu`: tests that need a CUDA device and the real (not interpreted) Triton compiler. They are skipped, and
reported as skipped, on a machine without CUDA and whenever TRITON_INTERPRET=1; run them with
`TRITON_INTERPRET=0 python -m pytest -m gpu tests/test_gpu.py` (gpu_check.py does this).

torch.compile's on-disk cache lives in a folder named after the hash of the op sources (ops.py, csrc/): a cache
written before an op's schema changed is never replayed against the new schema.
"""
import hashlib
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, ROOT)


def _op_sources_digest() -> str:
    paths = [os.path.join(ROOT, "ops.py")] + sorted(
        os.path.join(ROOT, "csrc", f) for f in os.listdir(os.path.join(ROOT, "csrc")))
    return hashlib.sha256(b"".join(open(p, "rb").read() for p in paths)).hexdigest()[:12]


os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"faceptor_inductor_{_op_sources_digest()}"))

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "dev", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "nightly", max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device and compiled (not interpreted) Triton kernels")


def pytest_collection_modifyitems(config, items):
    import torch
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return
    why = ("no CUDA device" if not torch.cuda.is_available() else
           "TRITON_INTERPRET=1 (run with TRITON_INTERPRET=0 to compile the kernels for the GPU)")
    skip = pytest.mark.skip(reason=f"gpu test: {why}")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
