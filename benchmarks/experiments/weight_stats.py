"""How far pretraining moved a backbone from timm's random init, layer by layer: why a fine-tune starts well or badly.

    python benchmarks/experiments/weight_stats.py runs/resnet18.dreamteacher_fmnist/export [other exports ...]

For each export (a `local-dir:` folder) and for a fresh timm init of the same architecture, it prints per stage:
the ratio of conv weight std to the init's (a large growth shrinks a later fine-tune's effective step), and the mean
|gamma| of each residual block's last BatchNorm (timm zero-initialises it, so ~0 means the residual branches are
still switched off and the block is close to its shortcut).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[2])

import argparse  # noqa: E402
import re  # noqa: E402
from collections import defaultdict  # noqa: E402

import timm  # noqa: E402
import torch  # noqa: E402


def stage_of(name: str) -> str:
    m = re.match(r"(layer\d+|stages\.\d+|blocks\.\d+)", name)
    return m.group(1) if m else "stem"


def stats(model: torch.nn.Module) -> dict[str, dict[str, float]]:
    """{stage: {"conv_std": mean std of its conv weights, "last_bn_gamma": mean |gamma| of blocks' last BN}}."""
    conv, gamma = defaultdict(list), defaultdict(list)
    last_bn = {n for n, m in model.named_modules() if getattr(m, "zero_init_last", None)}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            conv[stage_of(name)].append(module.weight.std().item())
    for block in last_bn:
        bn = getattr(model.get_submodule(block), "bn3", None) or getattr(model.get_submodule(block), "bn2", None)
        if bn is not None:
            gamma[stage_of(block)].append(bn.weight.abs().mean().item())
    return {s: {"conv_std": sum(v) / len(v), "last_bn_gamma": sum(gamma[s]) / len(gamma[s]) if gamma[s] else None}
            for s, v in conv.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("exports", nargs="+", help="export folders (timm local-dir)")
    args = p.parse_args(argv)
    for export in args.exports:
        model = timm.create_model(f"local-dir:{export}", pretrained=True)
        init = timm.create_model(model.default_cfg["architecture"], num_classes=0)
        trained, fresh = stats(model), stats(init)
        print(f"\n## {export} vs a fresh {model.default_cfg['architecture']}\n")
        print("| stage | conv weight std / init | last-BN mean abs gamma (init) |\n|---|---|---|")
        for stage, row in trained.items():
            g = row["last_bn_gamma"]
            gamma = "-" if g is None else f"{g:.4f} ({fresh[stage]['last_bn_gamma']:.4f})"
            print(f"| {stage} | {row['conv_std'] / fresh[stage]['conv_std']:.2f} | {gamma} |")


if __name__ == "__main__":
    main()
