"""``dynprune-fl`` / ``python -m dynprune.fl``: run the FL experiment, print its table.

With no flags: Fashion-MNIST if its files are found (else scikit-learn's
digits, and it says so), 10 non-IID clients, all four methods; about 5.5
minutes on 2 CPU cores. ``--resume`` continues the run in ``--out`` from its
last checkpoint (one is written after every round) to the same result.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import List, Optional

from dynprune.fl.data import DatasetError
from dynprune.fl.experiment import DATASETS, METHODS, MODELS, Config, load_config, run

# flag -> (Config field, type, help); defaults come from Config.
FLAGS = [
    ("--dataset", "dataset", str, f"one of {', '.join(DATASETS)}"),
    ("--data-dir", "data_dir", str, "folder with the dataset files (else $DYNPRUNE_DATA, Debian's path)"),
    ("--model", "model", str, f"one of {', '.join(MODELS)}"),
    ("--width", "width", float, "channel width multiplier of the model"),
    ("--clients", "clients", int, "number of clients"),
    ("--fraction", "fraction", float, "fraction of clients sampled per round"),
    ("--rounds", "rounds", int, "dense FedAvg rounds before (b) and (c) branch off"),
    ("--finetune-rounds", "finetune_rounds", int,
     "FL rounds of (b) and (c) after the branch; (a) trains on as many"),
    ("--local-epochs", "local_epochs", int, "local epochs per round"),
    ("--batch-size", "batch_size", int, "local batch size"),
    ("--lr", "lr", float, "local SGD learning rate"),
    ("--momentum", "momentum", float, "local SGD momentum"),
    ("--partition", "partition", str, "iid, dirichlet or shards"),
    ("--beta", "beta", float, "Dirichlet concentration (smaller: more skewed)"),
    ("--classes-per-client", "classes_per_client", int, "classes per client (shards)"),
    ("--samples", "samples", int, "training images shared out over the clients (0: all)"),
    ("--test-samples", "test_samples", int, "global test images (0: all)"),
    ("--keep-ratio", "keep_ratio", float, "fraction of output channels kept per layer (b, c, d)"),
    ("--saliency-weight", "saliency_weight", float, "weight of the gates' saliency L1 term"),
    ("--adapt-epochs", "adapt_epochs", int, "(d): local epochs of each client's gate adaptation"),
    ("--adapt-lr", "adapt_lr", float, "(d): learning rate of the gate adaptation"),
    ("--seed", "seed", int, "seed of the partition, sampling, init and training"),
    ("--latency-reps", "latency_reps", int, "batch-1 timing rounds per model"),
]


def parser() -> argparse.ArgumentParser:
    defaults = Config()
    p = argparse.ArgumentParser(
        prog="dynprune-fl", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, name, typ, help_ in FLAGS:
        p.add_argument(flag, type=typ, default=argparse.SUPPRESS,
                       help=f"{help_} (default: {getattr(defaults, name)})")
    p.add_argument("--methods", default=argparse.SUPPRESS,
                   help=f"comma-separated subset of {','.join(METHODS)} (default: all)")
    p.add_argument("--out", default="fl-results", help="output folder (default: fl-results)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run saved in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an --out folder that holds a previous run")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    given = {name: getattr(args, name) for _, name, _, _ in FLAGS if hasattr(args, name)}
    if hasattr(args, "methods"):
        given["methods"] = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    out = Path(args.out)
    try:
        base = dataclasses.asdict(load_config(out)) if args.resume else {}
        cfg = Config(**{**base, **given})
        if args.threads is not None:
            import torch
            torch.set_num_threads(args.threads)
        run(cfg, out, resume=args.resume, overwrite=args.overwrite,
            progress=not args.no_progress)
    except (ValueError, FileNotFoundError, FileExistsError, DatasetError) as err:
        print(f"dynprune-fl: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
