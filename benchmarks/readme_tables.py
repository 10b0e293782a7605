"""Prints the README's two result tables (whole networks at batch 1, ResNet-18
layers at keep 0.5) from the JSON `./dev.sh bench` writes, with each issue's bar
marked met or missed, so the README can be refreshed after a run:

    python benchmarks/readme_tables.py
"""
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
m = json.load(open(RESULTS / "models_cpu.json"))["rows"]
bars = {("resnet18", 0.5): 1.8, ("resnet18", 0.75): 3.0, ("resnet20", 0.5): 1.5, ("vgg16", 0.5): 1.8}
print("| model | keep | fewer MACs | dense ms | dense+pool ms | dynamic ms | static ms | speedup (bar) | vs dense+pool | static's speedup |")
print("|---|---|---|---|---|---|---|---|---|---|")
for r in m:
    if r["batch"] != 1: continue
    bar = bars.get((r["model"], r["target"]))
    sp = f"{r['speedup']:.2f}"
    if bar: sp += f" (>= {bar}: {'met' if r['speedup'] >= bar else '**missed**'})"
    print(f"| {r['model']} | {r['keep']} | {100*r['fewer_macs']:.1f}% | {r['dense_ms']:.2f} | {r['dense_pool_ms']:.2f} | {r['dynamic_ms']:.2f} | {r['static_ms']:.2f} | {sp} | {r['speedup_vs_dense_pool']:.2f} | {r['dense_ms']/r['static_ms']:.2f} |")
l = json.load(open(RESULTS / "layers_cpu.json"))["rows"]
print()
print("| layer | batch | dense ms | DynamicConv2d ms | static ms | masked ms | dyn/static (bar) | dense/dyn (bar) |")
print("|---|---|---|---|---|---|---|---|")
for r in l:
    if r["keep"] != 0.5 or not r["layer"].startswith("r18"): continue
    b1 = r["batch"] == 1
    ds_bar, dd_bar = (1.15, 2.5) if b1 else (1.3, 2.0)
    ds = f"{r['dyn_over_static']:.2f} (<= {ds_bar}: {'met' if r['dyn_over_static'] <= ds_bar else '**missed**'})"
    dd = f"{r['dense_over_dyn']:.2f} (>= {dd_bar}: {'met' if r['dense_over_dyn'] >= dd_bar else '**missed**'})"
    print(f"| {r['shape']} | {r['batch']} | {r['dense_ms']:.3f} | {r['dynamic_ms']:.3f} | {r['static_ms']:.3f} | {r['masked_ms']:.3f} | {ds} | {dd} |")
