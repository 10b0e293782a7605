"""Shared set-up for the pytest-benchmark suites: 2 threads, a ratio table at the end.

Each benchmark times its providers in turns and stores each one's median under
a key; at the end of the session the ratios (measured side by side, taking
turns, in this one run) are printed and written to benchmarks/results/.
"""
import json
import os
import platform
import time
from pathlib import Path

import pytest
import torch

import dynprune
from dynprune.bench import (format_model_rows, format_rows, keep_freed_memory, model_rows,
                            ratio_rows)

RESULTS = Path(__file__).parent / "results"
MEDIANS = {}
MODEL_MEDIANS, MODEL_INFOS = {}, {}
SUBSET = []  # set when -k/-m deselected cases: the results of a full run stay as they are


def pytest_deselected(items):
    if items:
        SUBSET.append(True)


def pytest_configure(config):
    torch.set_num_threads(int(os.environ.get("DYNPRUNE_BENCH_THREADS", "2")))
    keep_freed_memory()  # the baselines' outputs reuse memory, as the kernel's do


def _keep(benchmark, key, seconds) -> bool:
    """Store a provider's interleaved median in the benchmark's JSON extra_info."""
    if benchmark.stats is None:  # --benchmark-disable: nothing was timed
        return False
    benchmark.extra_info.setdefault("median_s", {})["/".join(map(str, key))] = seconds
    return True


@pytest.fixture
def record():
    """record(key, benchmark, seconds): keep a provider's median for the ratio table."""
    def _record(key, benchmark, seconds):
        if _keep(benchmark, key, seconds):
            MEDIANS[key] = seconds
    return _record


@pytest.fixture
def record_model():
    """record_model(key, benchmark, rows, seconds): a whole-network median and the case info."""
    def _record(key, benchmark, rows, seconds):
        if _keep(benchmark, key, seconds):
            MODEL_MEDIANS[key] = seconds
            MODEL_INFOS[key[:2]] = rows
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


def _write(terminalreporter, stem: str, title: str, table: str, rows) -> None:
    info = machine()
    head = f"{info['cpu']}, {info['threads']} threads, torch {info['torch']}, {info['date']}"
    terminalreporter.write_line("")
    terminalreporter.write_line(f"{title}, {head}")
    terminalreporter.write_line(table)
    if SUBSET:
        terminalreporter.write_line(f"(a subset of the cases ran: {RESULTS / stem}.* not written)")
        return
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=1))
    (RESULTS / f"{stem}.md").write_text(
        f"# {title}\n\n{head}. Command: `./dev.sh bench`. Medians of interleaved rounds (providers take turns); ratios from one run.\n\n"
        f"{table}\n")


def pytest_terminal_summary(terminalreporter):
    rows = ratio_rows(MEDIANS)
    if rows:
        _write(terminalreporter, "layers_cpu", "Layer speed (CPU)", format_rows(rows), rows)
    rows = model_rows(MODEL_MEDIANS, MODEL_INFOS)
    if rows:
        _write(terminalreporter, "models_cpu", "Whole-network speed (CPU)",
               format_model_rows(rows), rows)
