"""The suite's markers do what CONTRIBUTING says: a ``gpu`` test is skipped, with its reason, without CUDA."""

from __future__ import annotations

from pathlib import Path

import torch

pytest_plugins = ["pytester"]


def test_gpu_marker_skips_without_cuda_and_runs_with_it(pytester):
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makeini("[pytest]\nmarkers =\n    gpu: needs CUDA\n")
    pytester.makepyfile(
        "import pytest\n"
        "@pytest.mark.gpu\n"
        "def test_on_gpu():\n    assert False, 'ran'\n"
        "def test_plain():\n    pass\n"
    )
    result = pytester.runpytest("-rs", "-p", "no:cacheprovider")
    if torch.cuda.is_available():
        result.assert_outcomes(passed=1, failed=1)  # the gpu test ran (and failed on purpose)
    else:
        result.assert_outcomes(passed=1, skipped=1)
        result.stdout.fnmatch_lines(["*marked gpu: needs a CUDA device*"])
