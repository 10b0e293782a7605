"""Shared set-up for the pytest-benchmark suites: 2 threads, a ratio table at the end.

Each benchmark stores its median under a key; at the end of the session the
ratios (measured side by side in this one run) are printed and written to
benchmarks/results/.
"""
import json
import os
import platform
import time
from pathlib import Path

import pytest
import torch

import dynprune
from dynprune.bench import format_rows, ratio_rows

RESULTS = Path(__file__).parent / "results"
MEDIANS = {}


def pytest_configure(config):
    torch.set_num_threads(int(os.environ.get("DYNPRUNE_BENCH_THREADS", "2")))


@pytest.fixture
def record():
    """record(key, benchmark): keep the benchmark's median for the ratio table."""
    def _record(key, benchmark):
        if benchmark.stats is not None:  # None under --benchmark-disable
            MEDIANS[key] = benchmark.stats.stats.median
    return _record


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "backends": dynprune.backends(), "date": time.strftime("%Y-%m-%d")}


def pytest_terminal_summary(terminalreporter):
    rows = ratio_rows(MEDIANS)
    if not rows:
        return
    table = format_rows(rows)
    info = machine()
    terminalreporter.write_line("")
    terminalreporter.write_line(f"layer speed, {info['cpu']}, {info['threads']} threads, "
                                f"torch {info['torch']}, {info['date']}")
    terminalreporter.write_line(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "layers_cpu.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=1))
    (RESULTS / "layers_cpu.md").write_text(
        f"# Layer speed (CPU)\n\n{info['cpu']}, {info['threads']} threads, torch {info['torch']}, "
        f"{info['date']}. Command: `./dev.sh bench`. Medians; ratios from one run.\n\n{table}\n")
