"""convert() on torchvision's own model definitions: correctness, not speed.

    python benchmarks/torchvision_models.py [NAME ...]

Needs torchvision (not a dependency of dynprune: the models are the point,
its C++ ops are not used). For each model, with random BatchNorm statistics
so that folding errors show: the model converted at keep_ratio=1.0 against
the original (the issue's bar: 1e-4, max-normalised), and converted at 0.5 on
the native fast path against the same converted model in float64 (the
reference ops), plus how many convs became dynamic and the executed MAC
fraction at 0.5 (dynprune.flops, one 224x224 image). Prints one line a model.
"""
import copy
import sys
import warnings

import torch

import dynprune

NAMES = ["resnet18", "resnet50", "resnext50_32x4d", "mobilenet_v2", "mobilenet_v3_small",
         "efficientnet_b0", "densenet121", "regnet_y_400mf", "convnext_tiny",
         "shufflenet_v2_x1_0", "squeezenet1_1", "googlenet", "vgg11_bn", "mnasnet0_5"]


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def check(name: str, x: torch.Tensor) -> str:
    import torchvision.models as tvm

    kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    model = getattr(tvm, name)(**kwargs).eval()
    with torch.no_grad():
        for m in model.modules():  # statistics a trained model would have, not 0 and 1
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
        ref = model(x)
        same = dynprune.convert(copy.deepcopy(model), keep_ratio=1.0).eval()
        err_keep1 = max_rel(same(x), ref)
        half = dynprune.convert(copy.deepcopy(model), keep_ratio=0.5).eval()
        err_half = max_rel(half(x), copy.deepcopy(half).double()(x.double()))
        executed = dynprune.flops(half, x[:1]).ratio
    dynamic = sum(isinstance(m, dynprune.DynamicConv2d) for m in half.modules())
    ok = err_keep1 < 1e-4 and err_half < 1e-4
    return (f"{name:20} keep 1.0 vs original {err_keep1:.1e}   keep 0.5 vs float64 {err_half:.1e}"
            f"   dynamic convs {dynamic:3}   executed MACs {executed:.2f}   {'ok' if ok else 'FAIL'}")


def main(argv) -> int:
    try:
        import torchvision  # noqa: F401
    except Exception as exc:  # missing, or its C++ ops do not match this torch
        print(f"torchvision_models: torchvision unavailable ({type(exc).__name__}: {exc})")
        return 2
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    x = torch.randn(2, 3, 224, 224)
    failed = 0
    for name in argv or NAMES:
        try:
            line = check(name, x)
        except Exception as exc:  # report and go on with the next model
            line = f"{name:20} FAIL {type(exc).__name__}: {exc}"
        failed += "FAIL" in line
        print(line, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
