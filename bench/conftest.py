"""pytest-benchmark suite of the fused kernels and blocks (`pytest bench`).

Times each fused op and the whole block per backend on CUDA with a synchronised timer,
so `pytest bench --benchmark-autosave` then `--benchmark-compare` tracks regressions.
Everything here is skipped without a CUDA device; `pytest tests` never collects it.
"""
import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # benchlib
sys.path.insert(1, os.path.dirname(HERE))  # resnet_fused from a checkout


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")


def pytest_collection_modifyitems(config, items):
    # BENCH_DEVICE=cpu: a dry run of the suite's code at tiny CPU shapes (numbers mean
    # nothing); used to check the suite without a GPU.
    if torch.cuda.is_available() or os.environ.get("BENCH_DEVICE") == "cpu":
        return
    skip = pytest.mark.skip(reason="the benchmark suite times CUDA kernels; no CUDA device here")
    for item in items:
        if str(item.fspath).startswith(HERE + os.sep):  # only this suite's items
            item.add_marker(skip)


@pytest.fixture
def cuda_bench(benchmark):
    """benchmark(fn): time fn on the GPU. Each round runs fn `inner` times and then
    synchronises, so the host clock covers the device work; extra_info gets the median
    per call in ms (the number to read; the raw stats are per round)."""
    def run(fn, inner=10, rounds=15, **info):
        import benchlib as bl
        dev = bl.suite_config()["device"]
        for _ in range(3):  # warm-up: compilation, autotuning, cuDNN plans
            fn()
        bl.sync(dev)

        def round_():
            for _ in range(inner):
                fn()
            bl.sync(dev)
        benchmark.extra_info.update(info, inner_calls=inner)
        benchmark.pedantic(round_, rounds=rounds, iterations=1, warmup_rounds=1)
        st = benchmark.stats.stats
        benchmark.extra_info["ms_per_call_median"] = st.median * 1e3 / inner
        return st.median / inner
    return run
