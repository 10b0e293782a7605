"""The FL experiment end to end on scikit-learn's digits: report, files, resume, CLI."""
import json
import math

import pytest
import torch

from dynprune.fl.cli import main as cli_main
from dynprune.fl.experiment import Config, Interrupted, _converted, prepare_data, run
from dynprune.nn import DynamicConv2d

# Small enough for CI (a few seconds a run), large enough to learn something.
TINY = dict(dataset="digits", width=0.25, clients=4, fraction=1.0, rounds=4, finetune_rounds=2,
            lr=0.05, local_epochs=1,
            adapt_epochs=1, samples=0, test_samples=200, latency_reps=5, partition="dirichlet",
            beta=1.0)


def tiny(**kw) -> Config:
    return Config(**{**TINY, **kw})


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fl")
    return run(tiny(), out, progress=False, log=lambda s: None), out


def test_report_has_every_method_with_sane_values(full_run):
    report, out = full_run
    methods = report["methods"]
    assert list(methods) == ["dense", "static", "dynamic", "adaptive"]
    dense = report["dense_macs"]
    for name, r in methods.items():
        assert len(r["client_accs"]) == 4
        assert all(0.0 <= a <= 100.0 for a in r["client_accs"]), name
        assert 0.0 <= r["global_acc"] <= 100.0
        assert r["latency_ms"] > 0
        if name == "dense":
            assert r["executed_macs"] == dense
        else:  # keep 0.5 on input and output channels: well under 60% of dense
            assert 0 < r["executed_macs"] < 0.6 * dense, name
    # The dense model learned (chance is 10%), and so did the fine-tuned ones.
    assert sum(methods["dense"]["client_accs"]) / 4 > 40
    assert methods["dynamic"]["global_acc"] > 25
    # History: every round of every trained stage, in order.
    rounds = [(h["method"], h["round"]) for h in report["history"]]
    # (a) trains for rounds + finetune_rounds; (b), (c) branch off after 4.
    assert rounds == ([("dense", r) for r in range(1, 7)] + [("static", r) for r in (1, 2)]
                      + [("dynamic", r) for r in (1, 2)])


def test_report_files_are_written(full_run):
    report, out = full_run
    for name in ("report.json", "report.csv", "history.csv", "table.md",
                 "accuracy_per_round.png", "accuracy_vs_macs.png", "checkpoint.pt"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "report.json").read_text())
    assert saved["methods"]["adaptive"]["client_accs"] == report["methods"]["adaptive"]["client_accs"]
    csv_lines = (out / "report.csv").read_text().splitlines()
    assert len(csv_lines) == 5 and csv_lines[0].startswith("method,mean_client_acc")
    assert (out / "accuracy_per_round.png").read_bytes()[:4] == b"\x89PNG"


def test_static_policy_is_one_channel_set_for_everyone(full_run):
    report, out = full_run
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    cfg = tiny()
    prep = prepare_data(cfg)
    model = _converted(cfg, prep.data, state["done"]["dense"]["model"], frozen=True)
    model.load_state_dict(state["done"]["static"]["model"])
    model.eval()
    convs = [m for m in model.modules() if isinstance(m, DynamicConv2d)]
    assert convs and all(not p.requires_grad for m in convs for p in m.gate.parameters())
    x = prep.x_test[:16]
    for m in convs:  # neutral gate, frozen: the same top-k for every image
        idx, _ = m.gate.select(m.gate.saliency(torch.randn(16, m.in_channels, 4, 4)), m.k)
        assert (idx == idx[0]).all()
    # and the FL fine-tuning moved the weights
    before = _converted(cfg, prep.data, state["branch"], frozen=True).eval()
    assert not torch.equal(model(x), before(x))


def test_adaptation_changes_only_the_gates_and_bn_statistics(full_run):
    _, out = full_run
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    base = state["done"]["dynamic"]["model"]
    adapted = state["done"]["adaptive"]["models"][0]
    changed = {k for k in base if not torch.equal(base[k], adapted[k])}
    assert changed, "client 0 adapted nothing"
    assert all(".gate." in k or "running_" in k or "num_batches" in k for k in changed), changed
    assert any(".gate.fc." in k for k in changed)


def test_resume_continues_to_the_same_result(tmp_path, full_run):
    report, _ = full_run
    cfg = tiny()
    with pytest.raises(Interrupted):
        run(cfg, tmp_path, progress=False, log=lambda s: None, stop_after=7)  # mid 'static'
    with pytest.raises(FileExistsError, match="--resume"):
        run(cfg, tmp_path, progress=False, log=lambda s: None)
    with pytest.raises(Interrupted):  # once more, now inside 'dynamic'
        run(cfg, tmp_path, resume=True, progress=False, log=lambda s: None, stop_after=2)
    resumed = run(cfg, tmp_path, resume=True, progress=False, log=lambda s: None)
    assert resumed["history"] == report["history"]
    for name, r in report["methods"].items():
        assert resumed["methods"][name]["client_accs"] == r["client_accs"], name
        assert resumed["methods"][name]["global_acc"] == r["global_acc"], name
        assert math.isclose(resumed["methods"][name]["executed_macs"], r["executed_macs"])


def test_resume_refuses_other_settings_or_no_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run(tiny(), tmp_path, resume=True, progress=False, log=lambda s: None)
    with pytest.raises(Interrupted):
        run(tiny(), tmp_path, progress=False, log=lambda s: None, stop_after=1)
    with pytest.raises(ValueError, match="seed: saved 0, now 1"):
        run(tiny(seed=1), tmp_path, resume=True, progress=False, log=lambda s: None)


@pytest.mark.parametrize("kw, match", [
    (dict(keep_ratio=0.0), "keep ratio"), (dict(methods=("dense", "magic")), "methods"),
    (dict(fraction=1.5), "fraction"), (dict(partition="zipf"), "partition"),
    (dict(model="vgg"), "model"), (dict(clients=0), "clients"),
])
def test_bad_settings_are_clear_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kw)


def test_methods_pull_in_what_they_build_on():
    assert tiny(methods=("adaptive",)).stages() == ["dense", "dynamic", "adaptive"]
    assert tiny(methods=("static",)).stages() == ["dense", "static"]


def test_cli_runs_resumes_and_reports_errors(tmp_path, capsys):
    args = ["--dataset", "digits", "--width", "0.25", "--clients", "3", "--rounds", "1",
            "--finetune-rounds", "1", "--adapt-epochs", "1", "--samples", "300",
            "--test-samples", "50", "--latency-reps", "3", "--methods", "dense,static",
            "--out", str(tmp_path), "--no-progress"]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "a. dense FedAvg" in out and "b. static L1 pruning" in out
    assert "c. dynamic" not in out
    # --resume takes the saved settings; a finished run just reports again.
    assert cli_main(["--out", str(tmp_path), "--resume", "--no-progress"]) == 0
    assert "b. static L1 pruning" in capsys.readouterr().out
    assert cli_main(["--out", str(tmp_path), "--resume", "--seed", "3"]) == 2
    assert "other settings" in capsys.readouterr().err
    # A finished run is never overwritten by accident.
    assert cli_main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli_main(args + ["--overwrite"]) == 0
    assert cli_main(["--dataset", "mnist", "--data-dir", str(tmp_path / "none"),
                     "--out", str(tmp_path / "o")]) == 2
    assert "mnist" in capsys.readouterr().err


def test_cifar_resnet_model_runs_on_any_channel_count(tmp_path):
    # --model resnet20 (built from plain nn.Conv2d, made dynamic by convert()).
    cfg = tiny(model="resnet20", methods=("dynamic",), rounds=1, finetune_rounds=1,
               samples=200, test_samples=40, latency_reps=2)
    report = run(cfg, tmp_path, progress=False, log=lambda s: None)
    assert list(report["methods"]) == ["dense", "dynamic"]
    assert report["methods"]["dynamic"]["executed_macs"] < 0.6 * report["dense_macs"]
