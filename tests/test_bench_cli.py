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
