"""Every DreamTeacher checkpoint, declared once.

A `Recipe` says everything about one checkpoint: the timm architecture and tag, the Hub repo, the frozen
teacher and its taps, the regressor, the loss weights, the data and its preprocessing, the optimiser and
schedule, the licence and whether the weights are published. The timm registration, the trainer's defaults,
the exported `config.json` and the generated model card all read these objects; no hyper-parameter is typed
twice. Paper numbers and their ambiguities: arXiv:2307.07487 (see the README's "Recipe choices").
"""

from __future__ import annotations

import ast
import dataclasses
import fnmatch
import types
import typing
from dataclasses import dataclass, field
from typing import Literal

HUB_ORG = "dreamteacher"  # the one place the Hub organisation is named
PAPER_ID = "arXiv:2307.07487"
PAPER_URL = "https://arxiv.org/abs/2307.07487"
CODE_URL = "https://github.com/dreamteacher/dreamteacher-models"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FASHION_MNIST_MEAN = (0.2860, 0.2860, 0.2860)  # the 60k training images, replicated to 3 channels
FASHION_MNIST_STD = (0.3530, 0.3530, 0.3530)

TeacherKind = Literal["unet", "adm", "latent"]
WeightsStatus = Literal["published", "unpublished"]


@dataclass(frozen=True)
class TeacherConfig:
    """The frozen generative model whose features are distilled."""

    kind: TeacherKind  # unet: diffusers UNet2DModel; adm: guided-diffusion checkpoint; latent: Stable Diffusion
    source: str  # Hub repo id or local folder (an ADM .pt is converted with training/convert_adm.py)
    timestep: int  # x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, then one UNet pass at t
    taps: tuple[str, ...] = ()  # module names to read; () = each decoder level before its upsampler
    encoding: Literal["noise", "ddim"] = "noise"  # paper: fresh-noise encoding; DDIM inversion for the ablation
    adm_preset: str | None = None  # guided-diffusion flags preset, for kind == "adm"
    resolution: int | None = None  # teacher input size; None = the student's input size
    description: str = ""  # shown in model cards


@dataclass(frozen=True)
class DataConfig:
    """Training data and the preprocessing a user needs to fine-tune the backbone."""

    name: str  # short dataset id used in model cards ("imagenet-1k", "fashion-mnist")
    hub_dataset: str | None  # `datasets` Hub id when the data is on the Hub
    input_size: tuple[int, int, int]  # (C, H, W) the backbone was pretrained at
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float = 1.0  # resize shorter side to H / crop_pct, then center crop
    interpolation: str = "bicubic"
    hflip: bool = True  # the paper's only augmentation
    num_images: int | None = None  # size of the unlabeled training set


@dataclass(frozen=True)
class OptimConfig:
    optimizer: Literal["lamb", "adamw"]
    lr: float  # peak learning rate at `batch_size`
    weight_decay: float
    betas: tuple[float, float]
    batch_size: int  # global batch; the trainer accumulates gradients to reach it on any device count
    epochs: float
    warmup_epochs: float
    schedule: Literal["cosine"] = "cosine"
    min_lr: float = 0.0
    grad_clip: float | None = 3.0  # max gradient L2 norm; None = off


@dataclass(frozen=True)
class LossConfig:
    mse_weight: float = 1.0
    at_weight: float = 10.0  # paper: L_feat = L_MSE + 10 * L_AT
    norm_axes: Literal["chw", "c"] = "chw"  # non-learnable LayerNorm of teacher features over (C,H,W) per sample


@dataclass(frozen=True)
class LabelDistillConfig:
    """The paper's mix-distillation, L_mix = L_feat + weight x soft-CE(student head, interpreter) at `temperature`:
    on when `interpreter` names a folder written by training/train_interpreter.py."""

    interpreter: str | None = None
    weight: float = 1.0
    temperature: float = 4.0


@dataclass(frozen=True)
class Recipe:
    arch: str  # timm architecture
    tag: str  # timm pretrained tag
    teacher: TeacherConfig
    data: DataConfig
    optim: OptimConfig
    loss: LossConfig = field(default_factory=LossConfig)
    regressor_width: int = 256
    ppm_bins: tuple[int, ...] = (1, 2, 3, 6)
    # False: no PPM / top-down path in the regressor, each paired level regresses its target from itself alone
    regressor_top_down: bool = True
    # (student stride, teacher stride) per distilled student level; () = pair each teacher tap with the student
    # level at its own stride (training/distill/pairing.py). A finer teacher map is area-pooled to the student's grid.
    pairs: tuple[tuple[int, int], ...] = ()
    # timm's zero_init_last (resnet family: each residual block's last BN gamma starts at 0); None = timm's default
    zero_init_last: bool | None = None
    label_distill: LabelDistillConfig = field(default_factory=LabelDistillConfig)
    status: WeightsStatus = "unpublished"
    license: str = "apache-2.0"
    notes: str = ""

    @property
    def name(self) -> str:
        return f"{self.arch}.{self.tag}"

    @property
    def hub_id(self) -> str:
        return f"{HUB_ORG}/{self.name}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


ADM_IMAGENET_TEACHER = TeacherConfig(
    kind="adm",
    source="adm:256x256_diffusion_uncond",  # fetched, checked and converted once (training/teacher/adm_fetch.py)
    adm_preset="256x256_diffusion_uncond",
    timestep=150,
    description="OpenAI guided-diffusion ADM, unconditional ImageNet 256x256, decoder blocks 3/6/9/12 at t=150",
)
IMAGENET_DATA = DataConfig(
    name="imagenet-1k",
    hub_dataset="ILSVRC/imagenet-1k",
    input_size=(3, 256, 256),
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    num_images=1_281_167,
)
# Ambiguity 1: the appendix lists lr 4e-3, the main text 2e-4 x batch/256 (1.6e-3). We follow the appendix table.
IMAGENET_OPTIM = OptimConfig(
    optimizer="lamb", lr=4e-3, weight_decay=0.05, betas=(0.9, 0.95), batch_size=2048, epochs=200, warmup_epochs=30
)

PAPER_PAIRS = ((4, 4), (8, 8), (16, 16), (32, 32))  # ADM-256 output blocks 12/9/6/3 -> C2..C5, by stride

RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(arch="resnet50", tag="dreamteacher_in1k", teacher=ADM_IMAGENET_TEACHER, data=IMAGENET_DATA,
               optim=IMAGENET_OPTIM, license="other", pairs=PAPER_PAIRS,
               notes="ImageNet-1k images (no labels); ImageNet's terms of access apply to derived weights."),
        Recipe(arch="convnext_base", tag="dreamteacher_in1k", teacher=ADM_IMAGENET_TEACHER, data=IMAGENET_DATA,
               optim=IMAGENET_OPTIM, license="other", pairs=PAPER_PAIRS,
               notes="ImageNet-1k images (no labels); ImageNet's terms of access apply to derived weights."),
        Recipe(
            arch="resnet18",
            tag="dreamteacher_fmnist",
            teacher=TeacherConfig(
                kind="unet",
                source="teachers/ddpm-fashion-mnist-32",
                timestep=50,
                description="DDPM (diffusers UNet2DModel, 32x32) trained here on the 60k Fashion-MNIST train images",
            ),
            data=DataConfig(
                name="fashion-mnist",
                hub_dataset="zalando-datasets/fashion_mnist",
                input_size=(3, 32, 32),
                mean=FASHION_MNIST_MEAN,
                std=FASHION_MNIST_STD,
                interpolation="bilinear",
                num_images=60_000,
            ),
            optim=OptimConfig(
                optimizer="adamw", lr=4e-3, weight_decay=0.05, betas=(0.9, 0.95), batch_size=128, epochs=0.4,
                warmup_epochs=0.05,
            ),
            loss=LossConfig(at_weight=3.0),
            regressor_width=128,
            ppm_bins=(1,),
            # C2 <- stride 4, C3..C5 <- stride 8 (pooled 2x, 4x); the noise-predicting stride-1 level never runs
            pairs=((4, 4), (8, 8), (16, 8), (32, 8)),
            zero_init_last=False,
            license="mit",
            notes="In-domain recipe sized for minutes on a laptop CPU (the trainer's default): the paper's in-domain "
                  "optimiser, with batch 128 and 0.4 epoch instead of batch 256 and 100 epochs. Pairs, AT weight 3, "
                  "regressor width 128 and residual branches initialised on (zero_init_last=False) were chosen by "
                  "benchmarks/experiments/fmnist_ablation.py.",
        ),
    )
}

DEFAULT_RECIPE = "resnet18.dreamteacher_fmnist"


class UnknownRecipeError(KeyError):
    def __str__(self) -> str:  # KeyError would otherwise quote the whole message
        return str(self.args[0])


def list_recipes(pattern: str = "*") -> list[str]:
    """Names of the declared checkpoints matching a shell-style pattern, sorted."""
    return sorted(n for n in RECIPES if fnmatch.fnmatch(n, pattern))


def get_recipe(name: str) -> Recipe:
    """The recipe called `name` (`<arch>.<tag>`, an `hf-hub:` prefix and the org are tolerated)."""
    key = name.removeprefix("hf-hub:").removeprefix(f"{HUB_ORG}/")
    if key not in RECIPES:
        raise UnknownRecipeError(f"unknown DreamTeacher recipe {name!r}; known recipes: {', '.join(list_recipes())}")
    return RECIPES[key]


def recipe_from_dict(values: dict) -> Recipe:
    """Inverse of `Recipe.to_dict` (e.g. the resolved config a training run writes)."""
    return _build(Recipe, values, "")


def apply_overrides(recipe: Recipe, assignments: list[str]) -> Recipe:
    """Return `recipe` with `field.sub=value` assignments applied (values parsed as Python/JSON literals)."""
    values = recipe.to_dict()
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        if not sep:
            raise ValueError(f"override {assignment!r} is not of the form field=value (e.g. teacher.timestep=250)")
        *parents, leaf = key.strip().split(".")
        node = values
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ValueError(f"unknown recipe field {key!r}; known fields: {', '.join(recipe_fields())}")
            node = node[part]
        if leaf not in node or isinstance(node[leaf], dict):
            raise ValueError(f"unknown recipe field {key!r}; known fields: {', '.join(recipe_fields())}")
        node[leaf] = _parse_literal(raw.strip())
    return recipe_from_dict(values)


def recipe_fields(cls=Recipe, prefix: str = "") -> list[str]:
    """Dotted names of every settable recipe field."""
    names = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(_field_type(cls, f.name)):
            names += recipe_fields(_field_type(cls, f.name), f"{prefix}{f.name}.")
        else:
            names.append(prefix + f.name)
    return names


def _parse_literal(raw: str):
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return {"true": True, "false": False, "none": None, "null": None}.get(raw.lower(), raw)


def _field_type(cls, name: str):
    return typing.get_type_hints(cls)[name]


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def _build(cls, values: dict, path: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown recipe field(s) {sorted(path + u for u in unknown)}; known: {sorted(known)}")
    kwargs = {}
    for name, value in values.items():
        ftype = _field_type(cls, name)
        if dataclasses.is_dataclass(ftype):
            kwargs[name] = _build(ftype, value, f"{path}{name}.")
        else:  # JSON has no tuples; recipes are frozen and hashable
            kwargs[name] = _checked(_tuples(value) if isinstance(value, list) else value, ftype, path + name)
    return cls(**kwargs)


def _checked(value, ftype, where: str):
    """`value` if it is of the field's declared type (an int where a float is declared becomes a float), else a
    ValueError naming the field, the value and what is allowed."""
    origin, args = typing.get_origin(ftype), typing.get_args(ftype)
    ok, cast = False, value
    if origin is Literal:
        ok = value in args
    elif origin in (typing.Union, types.UnionType):
        for option in args:
            if option is type(None) and value is None:
                return None
            if option is not type(None):
                try:
                    return _checked(value, option, where)
                except ValueError:
                    continue
    elif origin is tuple:
        if isinstance(value, tuple):
            items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
            if len(items) == len(value):
                cast = tuple(_checked(v, t, f"{where}[{i}]") for i, (v, t) in enumerate(zip(value, items, strict=True)))
                ok = True
    elif ftype is bool:
        ok = isinstance(value, bool)
    elif ftype is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif ftype is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        cast = float(value) if ok else value
    elif ftype is str:
        ok = isinstance(value, str)
    else:
        ok = True
    if not ok:
        raise ValueError(f"recipe field {where}={value!r} is not {_describe(ftype)}")
    return cast


def _describe(ftype) -> str:
    origin, args = typing.get_origin(ftype), typing.get_args(ftype)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a tuple of {_describe(args[0])} (e.g. (1, 2))"
        return f"a tuple of {len(args)}: ({', '.join(_describe(a) for a in args)})"
    return {bool: "a bool (True or False)", int: "an int", float: "a number", str: "a string",
            type(None): "None"}.get(ftype, str(ftype))
