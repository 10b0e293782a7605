"""The FL report: a printed table, report.json, report.csv, history.csv and PNG plots."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Callable, Dict, List

__all__ = ["summary_rows", "format_table", "write_report"]

LABELS = {"dense": "a. dense FedAvg", "static": "b. static L1 pruning",
          "dynamic": "c. dynamic (FL gates)", "adaptive": "d. adaptive (client gates)"}
COLUMNS = ["method", "mean_client_acc", "worst_client_acc", "global_acc", "executed_mmacs",
           "mac_reduction_pct", "latency_ms", "speedup_vs_dense", "speedup_vs_dense_pool"]


def summary_rows(report: dict) -> List[Dict[str, float]]:
    """One flat row per method, in method order."""
    rows = []
    for method, r in report["methods"].items():
        accs = [a for a in r["client_accs"] if not math.isnan(a)]
        rows.append({
            "method": method,
            "mean_client_acc": sum(accs) / len(accs) if accs else float("nan"),
            "worst_client_acc": min(accs) if accs else float("nan"),
            "global_acc": r["global_acc"],
            "executed_mmacs": r["executed_macs"] / 1e6,
            "mac_reduction_pct": 100.0 * (1.0 - r["executed_macs"] / report["dense_macs"]),
            "latency_ms": r["latency_ms"],
            "speedup_vs_dense": report["dense_latency_ms"] / r["latency_ms"],
            "speedup_vs_dense_pool": report["dense_pool_latency_ms"] / r["latency_ms"],
        })
    return rows


def format_table(report: dict) -> str:
    """Markdown table of the summary rows, with the run's settings above it."""
    cfg = report["config"]
    head = (f"{report['note']}; {cfg['clients']} clients, {cfg['partition']}"
            + (f" beta={cfg['beta']}" if cfg["partition"] == "dirichlet" else "")
            + f", keep_ratio={cfg['keep_ratio']}, model={cfg['model']} width={cfg['width']}, "
            f"{cfg['rounds']}+{cfg['finetune_rounds']} rounds, seed={cfg['seed']}, "
            f"{report['threads']} threads. Latency: batch 1, medians of models timed side by side; "
            f"dense {report['dense_latency_ms']:.3f} ms, dense with the fast pools and classifier "
            f"{report['dense_pool_latency_ms']:.3f} ms.")
    lines = [head, "",
             "| method | mean client acc | worst client acc | global acc | MMACs/sample | fewer MACs "
             "| latency ms | speedup vs dense | vs dense+pool |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in summary_rows(report):
        lines.append(
            f"| {LABELS[r['method']]} | {r['mean_client_acc']:.2f} | {r['worst_client_acc']:.2f} "
            f"| {r['global_acc']:.2f} | {r['executed_mmacs']:.2f} | {r['mac_reduction_pct']:.1f}% "
            f"| {r['latency_ms']:.3f} | {r['speedup_vs_dense']:.2f}x "
            f"| {r['speedup_vs_dense_pool']:.2f}x |")
    return "\n".join(lines)


def write_report(report: dict, out: Path, log: Callable[[str], None] = print) -> None:
    """Print the table; write report.json/.csv, history.csv, table.md and the plots."""
    out = Path(out)
    table = format_table(report)
    log(table)
    (out / "table.md").write_text(table + "\n")
    (out / "report.json").write_text(json.dumps(report, indent=1))
    with open(out / "report.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in summary_rows(report):
            w.writerow(r)
    with open(out / "history.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["method", "round", "loss", "mean_client_acc"])
        w.writeheader()
        for h in report["history"]:
            w.writerow(h)
    try:
        plot(report, out)
        log(f"wrote {out}/table.md, report.json, report.csv, history.csv, accuracy_per_round.png, "
            "accuracy_vs_macs.png")
    except ImportError:
        log(f"wrote {out}/table.md, report.json, report.csv, history.csv "
            "(no plots: pip install matplotlib)")


def plot(report: dict, out: Path) -> None:
    """accuracy_per_round.png and accuracy_vs_macs.png (needs matplotlib)."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    dense_rounds = report["config"]["rounds"]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for method in ("dense", "static", "dynamic"):
        pts = [h for h in report["history"] if h["method"] == method]
        if pts:  # fine-tuning rounds continue after the dense ones
            offset = 0 if method == "dense" else dense_rounds
            ax.plot([h["round"] + offset for h in pts], [h["mean_client_acc"] for h in pts],
                    marker=".", label=LABELS[method])
    rows = {r["method"]: r for r in summary_rows(report)}
    if "adaptive" in rows:
        last = dense_rounds + report["config"]["finetune_rounds"]
        ax.scatter([last + 1], [rows["adaptive"]["mean_client_acc"]], marker="*", s=120,
                   color="C3", label=LABELS["adaptive"], zorder=3)
    ax.set_xlabel("FL round (b, c branch off a at --rounds; d adapts after c)")
    ax.set_ylabel("mean client test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy_per_round.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for i, (method, r) in enumerate(rows.items()):
        ax.scatter(r["executed_mmacs"], r["mean_client_acc"], s=60, color=f"C{i}",
                   label=f"{LABELS[method]} ({r['speedup_vs_dense']:.2f}x)")
    ax.set_xlabel("executed MMACs per sample")
    ax.set_ylabel("mean client test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(title="method (batch-1 speedup vs dense)")
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_macs.png", dpi=120)
    plt.close(fig)
