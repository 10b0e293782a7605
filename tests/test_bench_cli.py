"""`dynprune-bench` runs and prints its tables (timings themselves live in benchmarks/)."""
from dynprune.bench import LAYERS, main


def test_layers_table(capsys):
    main(["layers", "--batch", "1", "--keep", "0.5", "--budget", "0.005"])
    out = capsys.readouterr().out
    assert out.count("\n| r18.") + out.count("\n| vgg.") == len(LAYERS)


def test_models_table(capsys):
    main(["models", "--models", "resnet20", "--batch", "1", "--budget", "0.005"])
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("| resnet20 |")]
    assert len(lines) == 2  # ~50% and ~75% fewer MACs
    fewer = [float(l.split("|")[4].strip().rstrip("%")) for l in lines]
    assert 40 < fewer[0] < 60 and 65 < fewer[1] < 85


def test_interleaved_medians_take_turns():
    """Every provider runs once per round, the order rotates, and each gets its own median."""
    import time

    from dynprune.bench import interleaved_medians

    calls = []
    fns = {"slow": lambda: (calls.append("slow"), time.sleep(0.003)),
           "fast": lambda: calls.append("fast"), "other": lambda: calls.append("other")}
    medians = interleaved_medians(fns, budget_s=0.0, min_rounds=6)
    timed = calls[6:]  # after the warm-up and the sizing round
    assert len(timed) == 18 and all(timed.count(k) == 6 for k in fns)
    firsts = {timed[3 * r] for r in range(6)}
    assert firsts == set(fns)  # no provider is always first
    assert medians["slow"] >= 0.003 > medians["fast"]
