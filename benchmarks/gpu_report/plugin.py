"""The pytest plugin behind the tests part (pytest -p benchmarks.gpu_report.plugin): keeps the CUDA tests only.
It imports torch but not triton: pytest loads it before tests/conftest.py sets TRITON_INTERPRET."""
import re

import torch

CUDA_WORDS = re.compile(r"cuda|gpu", re.I)


def is_cuda_test(item, cuda):
    """Marked `cuda`, or skipped by a skipif that follows CUDA's availability and says so in its reason."""
    if item.get_closest_marker("cuda"):
        return True
    return any(m.args and not isinstance(m.args[0], str) and bool(m.args[0]) == (not cuda)
               and CUDA_WORDS.search(str(m.kwargs.get("reason", ""))) for m in item.iter_markers("skipif"))


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (python -m benchmarks.gpu_report runs these)")


def pytest_collection_modifyitems(config, items):
    cuda = torch.cuda.is_available()
    keep = [i for i in items if is_cuda_test(i, cuda)]
    drop = [i for i in items if not is_cuda_test(i, cuda)]
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep
