"""The FL experiment: four methods side by side on one partition and seed.

  a. ``dense``    FedAvg of the plain model.
  b. ``static``   the dense FedAvg model, converted with its gates frozen
                  neutral: every sample and client keeps the same channels, the
                  ones with the largest L1 filter norms (BN scale included), at
                  the same keep ratio per layer as (c)/(d); fine-tuned in FL.
  c. ``dynamic``  the dense FedAvg model, converted, its FBS gates and weights
                  trained in FL with the saliency L1 regulariser.
  d. ``adaptive`` (c), then every client trains its own gates (and lets its
                  BatchNorm statistics follow its data) for a few local epochs:
                  a data-aware policy per client.

(a) runs ``rounds + finetune_rounds`` rounds; (b) and (c) branch off its
model after ``rounds`` and fine-tune for ``finetune_rounds`` (a trained network
is the starting point, as in the FBS paper), so every method gets the same
number of FL rounds. The dense stage runs whenever any method is asked for.

Everything is seeded per (stage, round): a run stopped after any round and
resumed from its checkpoint ends with the same models and accuracies.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from dynprune.convert import _fast_ops, convert
from dynprune.fl.data import Dataset, DatasetError, load_dataset
from dynprune.fl.evaluate import accuracy, executed_macs, latency
from dynprune.fl.fedavg import fedavg_round, local_train, sample_clients
from dynprune.fl.partition import ClientSplit, describe, partition
from dynprune.nn import DynamicConv2d, saliency_loss

__all__ = ["METHODS", "Config", "Interrupted", "build_model", "prepare_data", "run"]

METHODS = ("dense", "static", "dynamic", "adaptive")
NEEDS = {"dense": ("dense",), "static": ("dense", "static"), "dynamic": ("dense", "dynamic"),
         "adaptive": ("dense", "dynamic", "adaptive")}
MODELS = ("cnn", "resnet20")
DATASETS = ("auto", "fashion-mnist", "mnist", "cifar10", "digits")
LATENCY_CLIENTS = 3  # adapted client models timed for (d)


@dataclass
class Config:
    """Everything that determines a run's result (saved in its checkpoint)."""

    dataset: str = "auto"            # auto: Fashion-MNIST if present, else digits
    data_dir: Optional[str] = None
    model: str = "cnn"               # cnn (FashionCNN) or resnet20
    width: float = 1.0
    clients: int = 10
    fraction: float = 0.5            # clients sampled per round
    rounds: int = 15                 # dense rounds before (b) and (c) branch off
    finetune_rounds: int = 8         # FL rounds of (b) and (c); (a) trains on as long
    local_epochs: int = 2
    batch_size: int = 32
    lr: float = 0.02                 # 0.05 swung 10+ points between rounds on non-IID clients
    momentum: float = 0.9
    partition: str = "dirichlet"
    beta: float = 0.5
    classes_per_client: int = 2      # shards partition
    samples: int = 3000              # training images shared out (0: all)
    test_samples: int = 2000         # global test images (0: all)
    keep_ratio: float = 0.5
    saliency_weight: float = 1e-4    # lambda of the saliency L1 term, (c) and (d)
    adapt_epochs: int = 2            # (d): local epochs of gate adaptation
    adapt_lr: float = 0.05
    methods: Tuple[str, ...] = METHODS
    seed: int = 0
    latency_reps: int = 100

    def __post_init__(self):
        self.methods = tuple(self.methods)
        checks = [
            (self.dataset in DATASETS, f"dataset must be one of {DATASETS}"),
            (self.model in MODELS, f"model must be one of {MODELS}"),
            (self.partition in ("iid", "dirichlet", "shards"),
             "partition must be iid, dirichlet or shards"),
            (bool(self.methods) and all(m in METHODS for m in self.methods),
             f"methods must be a non-empty subset of {METHODS}"),
            (self.clients >= 1, "clients must be >= 1"),
            (0.0 < self.fraction <= 1.0, "fraction must be in (0, 1]"),
            (self.rounds >= 1 and self.finetune_rounds >= 0, "rounds must be >= 1, finetune rounds >= 0"),
            (self.local_epochs >= 1 and self.adapt_epochs >= 0, "local epochs must be >= 1"),
            (0.0 < self.keep_ratio <= 1.0, "keep ratio must be in (0, 1]"),
            (self.beta > 0, "beta must be > 0"),
            (self.width > 0, "width must be > 0"),
            (self.samples >= 0 and self.test_samples >= 0, "samples must be >= 0"),
            (self.lr > 0 and self.adapt_lr > 0, "learning rates must be > 0"),
            (self.batch_size >= 2, "batch size must be >= 2"),
            (self.latency_reps >= 1, "latency reps must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{message} (config: {self})")

    def stages(self) -> List[str]:
        """The methods to run, with what they build on, in run order."""
        wanted = {s for m in self.methods for s in NEEDS[m]}
        return [m for m in METHODS if m in wanted]


class Interrupted(Exception):
    """Raised by ``run(..., stop_after=n)`` after n rounds (tests of --resume)."""


def _seed(*parts) -> int:
    """A stable seed from parts (Python's hash() of a str varies per process)."""
    return zlib.crc32(":".join(map(str, parts)).encode()) & 0x7FFFFFFF


# ---------------------------------------------------------------------------- data

@dataclass
class Prepared:
    data: Dataset
    note: str                                     # which dataset, and why
    splits: List[ClientSplit]
    client_train: List[Tuple[torch.Tensor, torch.Tensor]]
    client_test: List[Tuple[torch.Tensor, torch.Tensor]]
    x_test: torch.Tensor                          # global test set (subset)
    y_test: torch.Tensor
    y_pool: torch.Tensor = field(repr=False)      # labels of the partitioned pool


def prepare_data(cfg: Config) -> Prepared:
    """Load the dataset, take the seeded subsets, partition over the clients."""
    if cfg.dataset == "auto":
        try:
            data = load_dataset("fashion-mnist", cfg.data_dir)
            note = "dataset: fashion-mnist (found)"
        except DatasetError as err:
            data = load_dataset("digits")
            first = str(err).splitlines()[0]
            note = f"dataset: digits (scikit-learn's bundled set; Fashion-MNIST not found: {first})"
    else:
        data = load_dataset(cfg.dataset, cfg.data_dir)
        note = f"dataset: {cfg.dataset}"
    rng = np.random.default_rng(_seed(cfg.seed, "subset"))
    pool = rng.permutation(len(data.y_train))
    if cfg.samples:
        pool = np.sort(pool[:cfg.samples])
    test = rng.permutation(len(data.y_test))
    if cfg.test_samples:
        test = np.sort(test[:cfg.test_samples])
    x_pool, y_pool = data.x_train[pool], data.y_train[pool]
    splits = partition(y_pool, cfg.clients, cfg.partition, beta=cfg.beta,
                       classes_per_client=cfg.classes_per_client, seed=cfg.seed)
    client_train = [(x_pool[s.train], y_pool[s.train]) for s in splits]
    client_test = [(x_pool[s.test], y_pool[s.test]) for s in splits]
    return Prepared(data, note, splits, client_train, client_test, data.x_test[test],
                    data.y_test[test], y_pool)


def build_model(cfg: Config, data: Dataset) -> nn.Module:
    """A fresh plain model (nn.Conv2d throughout), seeded."""
    from dynprune.models import FashionCNN, resnet20
    torch.manual_seed(_seed(cfg.seed, "init"))
    channels = data.x_train.shape[1]
    if cfg.model == "cnn":
        return FashionCNN(data.num_classes, cfg.width, in_channels=channels)
    return resnet20(data.num_classes, cfg.width, in_channels=channels)


def _converted(cfg: Config, data: Dataset, dense_state: Optional[Dict[str, torch.Tensor]],
               frozen: bool) -> nn.Module:
    """The dense model (with ``dense_state`` if given) converted at cfg.keep_ratio;
    ``frozen``: gates fixed neutral, so the filter-norm priority picks one channel
    set for everyone."""
    model = build_model(cfg, data)
    if dense_state is not None:
        model.load_state_dict(dense_state)
    convert(model, cfg.keep_ratio)
    if frozen:
        for m in model.modules():
            if isinstance(m, DynamicConv2d):
                m.gate.requires_grad_(False)
    return model


def _restored(cfg: Config, data: Dataset, converted_state: Dict[str, torch.Tensor],
              frozen: bool = False) -> nn.Module:
    """A converted model loaded from its own state dict (priorities included)."""
    model = _converted(cfg, data, None, frozen)
    model.load_state_dict(converted_state)
    return model


# ---------------------------------------------------------------------------- checkpoint

def _save(state: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: an interrupted save never leaves half a checkpoint


def _load(path: Path, cfg: Optional[Config]) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"--resume: no checkpoint at {path} (run once without --resume)")
    state = torch.load(path, weights_only=False)
    saved = state["config"]
    if cfg is not None:
        diff = {k: (saved[k], v) for k, v in dataclasses.asdict(cfg).items() if saved.get(k) != v}
        if diff:
            raise ValueError("--resume: the checkpoint was made with other settings "
                             + ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items()))
    return state


def load_config(out: Path) -> Config:
    """The config saved in ``out``'s checkpoint."""
    state = _load(Path(out) / "checkpoint.pt", None)
    return Config(**state["config"])


# ---------------------------------------------------------------------------- the run

def run(cfg: Config, out: Path, *, resume: bool = False, overwrite: bool = False,
        progress: bool = True, stop_after: Optional[int] = None,
        log: Callable[[str], None] = print) -> dict:
    """Train every stage, checkpointing after each round, then measure and report.

    Returns the report (see :mod:`dynprune.fl.report`), also written to ``out``.
    A folder that holds a checkpoint is continued (``resume``) or, only with
    ``overwrite``, started over. ``stop_after=n`` raises :class:`Interrupted`
    once n rounds ran in this call.
    """
    from tqdm.auto import tqdm

    from dynprune.fl.report import write_report

    out = Path(out)
    ckpt = out / "checkpoint.pt"
    if ckpt.exists() and not (resume or overwrite):
        raise FileExistsError(f"{out} holds a previous run (checkpoint.pt): continue it with "
                              "--resume, start over with --overwrite, or pick another --out")
    out.mkdir(parents=True, exist_ok=True)
    prep = prepare_data(cfg)
    log(prep.note)
    log(f"{cfg.clients} clients, partition {cfg.partition}"
        + (f" (beta={cfg.beta})" if cfg.partition == "dirichlet" else "")
        + f", {sum(len(t[1]) for t in prep.client_train)} training images")
    if cfg.clients <= 20:
        log(describe(prep.splits, prep.y_pool, prep.data.num_classes))
    if resume:
        state = _load(ckpt, cfg)
        log(f"resuming from {ckpt}: done {list(state['done'])}"
            + (f", {state['current']['stage']} at round {state['current']['round']}"
               if state["current"] else ""))
    else:
        state = {"config": dataclasses.asdict(cfg), "done": {}, "current": None, "history": []}
    rounds_run = 0

    def mean_client_acc(model):  # clients with an empty test split do not count
        accs = [accuracy(model, x, y) for x, y in prep.client_test if len(x)]
        return float(np.mean(accs)) if accs else float("nan")

    for stage in cfg.stages():
        if stage in state["done"]:
            continue
        if stage == "adaptive":
            _adapt(cfg, prep, state, ckpt, progress, tqdm)
            continue
        if stage == "dense":
            model, total = build_model(cfg, prep.data), cfg.rounds + cfg.finetune_rounds
        else:
            model = _converted(cfg, prep.data, state["branch"], stage == "static")
            total = cfg.finetune_rounds
        start = 0
        cur = state["current"]
        if cur is not None and cur["stage"] == stage:
            model.load_state_dict(cur["model"])
            start = cur["round"]
        extra = (lambda m: cfg.saliency_weight * saliency_loss(m)) if stage == "dynamic" else None
        bar = tqdm(range(start, total), desc=f"{stage:>8}", initial=start, total=total,
                   disable=not progress, leave=True)
        for r in bar:
            rng = np.random.default_rng(_seed(cfg.seed, stage, r, "sample"))
            chosen = sample_clients(cfg.clients, cfg.fraction, rng)
            loss = fedavg_round(model, prep.client_train, chosen, epochs=cfg.local_epochs,
                                lr=cfg.lr, momentum=cfg.momentum, batch_size=cfg.batch_size,
                                seed=_seed(cfg.seed, stage, r), extra_loss=extra)
            acc = mean_client_acc(model)
            state["history"].append({"method": stage, "round": r + 1, "loss": loss,
                                     "mean_client_acc": acc})
            state["current"] = {"stage": stage, "round": r + 1, "model": model.state_dict()}
            if stage == "dense" and r + 1 == cfg.rounds:  # where (b) and (c) branch off
                state["branch"] = {k: v.clone() for k, v in model.state_dict().items()}
            _save(state, ckpt)
            bar.set_postfix(loss=f"{loss:.3f}", client_acc=f"{acc:.1f}")
            rounds_run += 1
            if stop_after is not None and rounds_run >= stop_after:
                raise Interrupted(f"stopped after {rounds_run} rounds")
        state["done"][stage] = {"model": model.state_dict()}
        state["current"] = None
        _save(state, ckpt)

    report = _measure(cfg, prep, state, log)
    write_report(report, out, log=log)
    return report


def _adapt(cfg: Config, prep: Prepared, state: dict, ckpt: Path, progress: bool, tqdm) -> None:
    """(d): every client adapts the gates of the FL-trained dynamic model."""
    done = state.setdefault("adapt_partial", {"clients": [], "models": {}})
    base = _restored(cfg, prep.data, state["done"]["dynamic"]["model"])
    start = len(done["clients"])
    for c in tqdm(range(start, cfg.clients), desc="adaptive", initial=start, total=cfg.clients,
                  disable=not progress, leave=True):
        model = copy.deepcopy(base)
        for name, p in model.named_parameters():
            p.requires_grad_(".gate." in f".{name}")
        x, y = prep.client_train[c]
        if cfg.adapt_epochs and len(x):
            local_train(model, x, y, epochs=cfg.adapt_epochs, lr=cfg.adapt_lr,
                        momentum=cfg.momentum, batch_size=cfg.batch_size,
                        seed=_seed(cfg.seed, "adapt", c),
                        extra_loss=lambda m: cfg.saliency_weight * saliency_loss(m))
        xt, yt = prep.client_test[c]
        macs = executed_macs(model, xt) if len(xt) else {"executed_macs": float("nan")}
        done["clients"].append({"client": c, "test_size": len(xt),
                                "client_acc": accuracy(model, xt, yt),
                                "global_acc": accuracy(model, prep.x_test, prep.y_test),
                                "executed_macs": macs["executed_macs"]})
        if c < LATENCY_CLIENTS:
            done["models"][c] = model.state_dict()
        _save(state, ckpt)
    state["done"]["adaptive"] = state.pop("adapt_partial")
    _save(state, ckpt)


def _measure(cfg: Config, prep: Prepared, state: dict, log) -> dict:
    """Accuracy, executed MACs and batch-1 latency of every method that ran."""
    done = state["done"]
    dense = build_model(cfg, prep.data)
    dense.load_state_dict(done["dense"]["model"])
    dense_pool = copy.deepcopy(dense)
    _fast_ops(dense_pool)  # the pools and classifier the fast path also uses
    macs_x = prep.x_test[:256]
    dense_macs = executed_macs(dense, macs_x)["dense_macs"]
    timed = {"dense": dense, "dense_pool": dense_pool}
    rows: Dict[str, dict] = {}
    for stage in ("dense", "static", "dynamic"):
        if stage not in done:
            continue
        if stage == "dense":
            model = dense
        else:
            model = _restored(cfg, prep.data, done[stage]["model"], stage == "static")
            timed[stage] = model
        client = [accuracy(model, x, y) for x, y in prep.client_test]
        rows[stage] = {"client_accs": client,
                       "global_acc": accuracy(model, prep.x_test, prep.y_test),
                       "executed_macs": (dense_macs if stage == "dense"
                                         else executed_macs(model, macs_x)["executed_macs"])}
    if "adaptive" in done:
        per = done["adaptive"]["clients"]
        sizes = np.array([p["test_size"] for p in per], dtype=float)
        macs = np.array([p["executed_macs"] for p in per], dtype=float)
        ok = sizes > 0
        rows["adaptive"] = {"client_accs": [p["client_acc"] for p in per],
                            "global_acc": float(np.mean([p["global_acc"] for p in per])),
                            "executed_macs": float(np.average(macs[ok], weights=sizes[ok]))}
        for c, sd in done["adaptive"]["models"].items():
            timed[f"adaptive_{c}"] = _restored(cfg, prep.data, sd)
    log(f"timing {len(timed)} models at batch 1, side by side ({cfg.latency_reps} rounds)")
    ms = latency(timed, prep.x_test[:32], reps=cfg.latency_reps)
    for stage, row in rows.items():
        if stage == "dense":
            row["latency_ms"] = ms["dense"]
        elif stage == "adaptive":
            row["latency_ms"] = float(np.median([v for k, v in ms.items() if k.startswith("adaptive_")]))
        else:
            row["latency_ms"] = ms[stage]
    return {"config": dataclasses.asdict(cfg), "note": prep.note, "dense_macs": dense_macs,
            "dense_latency_ms": ms["dense"], "dense_pool_latency_ms": ms["dense_pool"],
            "methods": rows, "history": state["history"], "threads": torch.get_num_threads()}
