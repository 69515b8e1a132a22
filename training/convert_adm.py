"""Convert an OpenAI guided-diffusion (ADM) checkpoint into a diffusers UNet2DModel folder (training/teacher/adm.py
does the conversion; this is its command line).

    python training/convert_adm.py --checkpoint 256x256_diffusion_uncond.pt --out teachers/adm256 \\
        --preset 256x256_diffusion_uncond
    # or the guided-diffusion README flags themselves (dash or underscore spelling):
    python training/convert_adm.py --checkpoint model.pt --out DIR --image_size 256 --num_channels 256 \\
        --num_res_blocks 2 --attention_resolutions 32,16,8 --num_head_channels 64 --learn_sigma True \\
        --resblock_updown True --use_scale_shift_norm True
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python training/convert_adm.py` puts training/, not the repo, on sys.path
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from training.teacher.adm import FLAGS_FILE, PRESETS, ADMFlags, convert_to_folder


def _str2bool(v: str) -> bool:
    s = str(v).strip().lower()
    if s in ("1", "true", "t", "yes", "y"):
        return True
    if s in ("0", "false", "f", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {v!r}")


_FLAG_HELP = {
    "image_size": "training resolution (square), e.g. 256",
    "num_channels": "base width: channels of the first level (input_blocks.0.0 output)",
    "num_res_blocks": "ResBlocks per encoder level (the decoder has one more per level)",
    "channel_mult": "per-level width multipliers, e.g. 1,1,2,2,4,4; empty = guided-diffusion's default for image_size",
    "attention_resolutions": "feature-map sizes with self-attention, e.g. 32,16,8",
    "num_head_channels": "channels per attention head; -1 = use --num-heads",
    "num_heads": "attention heads (used only when --num-head-channels is -1)",
    "num_heads_upsample": "decoder attention heads; -1 = same as --num-heads",
    "learn_sigma": "True if the model predicts eps and the variance (6 output channels)",
    "class_cond": "True for ImageNet class-conditional models (1000 classes)",
    "resblock_updown": "True if ResBlocks do the down/upsampling (else strided conv / nearest+conv)",
    "use_scale_shift_norm": "True for FiLM-like timestep conditioning (GroupNorm * (1 + scale) + shift)",
    "use_new_attention_order": "qkv layout of the attention: True = q|k|v then heads; False = heads then q|k|v",
    "dropout": "dropout rate (kept in the diffusers config; inactive in eval mode)",
    "use_fp16": "accepted for copy-paste of MODEL_FLAGS; ignored (weights are converted to float32)",
}
# guided-diffusion MODEL_FLAGS that describe the diffusion, not the UNet: accepted so README flags can be pasted
_IGNORED = (
    "diffusion_steps",
    "noise_schedule",
    "timestep_respacing",
    "use_kl",
    "predict_xstart",
    "rescale_timesteps",
    "rescale_learned_sigmas",
    "use_checkpoint",
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python training/convert_adm.py",
        description="Convert an OpenAI guided-diffusion (ADM) checkpoint into a diffusers UNet2DModel folder "
        "(config.json + diffusion_pytorch_model.safetensors + adm_flags.json). Model flags come from --preset "
        "and/or the guided-diffusion README flags (dash or underscore spelling; explicit flags override the preset).",
    )
    p.add_argument(
        "--checkpoint", required=False, help="ADM checkpoint: .pt (loaded with weights_only=True) or .safetensors"
    )
    p.add_argument(
        "--out", required=False, help="output folder (written atomically); loads with UNet2DModel.from_pretrained"
    )
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="flags of a released guided-diffusion checkpoint; the paper teacher is 256x256_diffusion_uncond",
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--list-presets", action="store_true", help="print the presets and their flags, then exit")
    g = p.add_argument_group(
        "ADM model flags (guided-diffusion README names; unset = the preset's value, else guided-diffusion's default)"
    )
    for f in dataclasses.fields(ADMFlags):
        names = [f"--{f.name.replace('_', '-')}"] + ([f"--{f.name}"] if "_" in f.name else [])
        if f.type in ("bool", bool):
            kw: dict[str, Any] = dict(type=_str2bool, metavar="True|False")
        elif f.type in ("int", int):
            kw = dict(type=int)
        elif f.type in ("float", float):
            kw = dict(type=float)
        else:
            kw = dict(type=str)
        g.add_argument(
            *names,
            dest=f.name,
            default=None,
            help=f"{_FLAG_HELP[f.name]} (guided-diffusion default: {f.default!r})",
            **kw,
        )
    ig = p.add_argument_group("diffusion flags (accepted so README MODEL_FLAGS paste; they do not affect the UNet)")
    for name in _IGNORED:
        ig.add_argument(
            f"--{name.replace('_', '-')}",
            f"--{name}",
            dest=f"ignored_{name}",
            default=None,
            metavar="VALUE",
            help=argparse.SUPPRESS if name == "use_checkpoint" else "ignored by the conversion",
        )
    return p


def flags_from_args(args: argparse.Namespace) -> ADMFlags:
    base = PRESETS[args.preset] if args.preset else ADMFlags()
    fields = dataclasses.fields(ADMFlags)
    overrides = {f.name: getattr(args, f.name) for f in fields if getattr(args, f.name) is not None}
    return dataclasses.replace(base, **overrides)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.list_presets:
        for name, fl in PRESETS.items():
            print(f"{name}: {json.dumps(fl.to_json_dict())}")
        return 0
    if not args.checkpoint or not args.out:
        parser.error("--checkpoint and --out are required")
    try:
        flags = flags_from_args(args)
        unet = convert_to_folder(args.checkpoint, flags, args.out, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n_params = sum(p.numel() for p in unet.parameters())
    noise = args.ignored_noise_schedule
    print(f"wrote {args.out}: diffusers UNet2DModel, {n_params:,} parameters ({n_params / 1e6:.1f}M), float32")
    print(f"flags: {json.dumps(flags.to_json_dict())}")
    print(f"config: {json.dumps({k: v for k, v in unet.config.items() if not k.startswith('_')}, default=list)}")
    for t in json.loads((Path(args.out) / FLAGS_FILE).read_text())["taps"]:
        print(
            f"tap stride {t['stride']:>2}: ADM output_blocks[{t['adm_index']}] (1-based block {t['adm_index'] + 1})"
            f" -> {t['module']} ({t['channels']} channels)"
        )
    if noise:
        print(f"note: noise_schedule={noise} is a diffusion setting, not stored in the UNet: configure the scheduler")
    return 0


if __name__ == "__main__":
    from training.run.cli import run

    sys.exit(run(main))
