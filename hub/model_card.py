"""Model cards generated from a recipe, in the shape timm's own Hub cards have."""

from __future__ import annotations

from collections.abc import Mapping

from huggingface_hub import ModelCard, ModelCardData

from dreamteacher_models.recipes import CODE_URL, PAPER_ID, PAPER_URL, Recipe

CITATION = """@inproceedings{li2023dreamteacher,
  title     = {DreamTeacher: Pretraining Image Backbones with Deep Generative Models},
  author    = {Li, Daiqing and Ling, Huan and Kar, Amlan and Acuna, David and Kim, Seung Wook and Kreis, Karsten
               and Torralba, Antonio and Fidler, Sanja},
  booktitle = {Proceedings of the IEEE/CVF International Conference on Computer Vision (ICCV)},
  year      = {2023}
}"""

Results = Mapping[str, Mapping[str, float]]  # {protocol: {metric: value}}


def _recipe_rows(recipe: Recipe) -> list[tuple[str, str]]:
    t, d, o, loss = recipe.teacher, recipe.data, recipe.optim, recipe.loss
    return [
        ("teacher", t.description or f"{t.kind}: {t.source}"),
        ("teacher timestep t", str(t.timestep)),
        ("teacher encoding", "x_t = sqrt(abar_t) x_0 + sqrt(1-abar_t) eps, fresh eps, one UNet pass"
         if t.encoding == "noise" else "DDIM inversion to t"),
        ("teacher taps", ", ".join(t.taps) if t.taps else "each decoder level before its upsampler"),
        ("student level <- teacher tap (by stride)", _pairing(recipe)),
        ("feature regressor", f"FPN + PPM (bins {recipe.ppm_bins}), width {recipe.regressor_width}"
         if recipe.regressor_top_down else f"per level (no top-down path), width {recipe.regressor_width}"),
        ("loss", f"{loss.mse_weight} x MSE(LN_{loss.norm_axes}(teacher)) + {loss.at_weight} x attention transfer"),
        ("data", f"{d.name} ({d.num_images:,} images, labels unused)" if d.num_images else d.name),
        ("resolution", f"{d.input_size[1]}x{d.input_size[2]}"),
        ("augmentation", "horizontal flip" if d.hflip else "none"),
        ("optimizer", f"{o.optimizer.upper() if o.optimizer == 'lamb' else 'AdamW'}, lr {o.lr:g}, "
                      f"weight decay {o.weight_decay:g}, betas {o.betas}"),
        ("batch / epochs / warm-up", f"{o.batch_size} / {o.epochs:g} / {o.warmup_epochs:g} ({o.schedule})"),
    ]


def _pairing(recipe: Recipe) -> str:
    if not recipe.pairs:
        return "each teacher tap feeds the student level at its own stride"
    return ", ".join(f"stride {s} <- {t}" + (f" (area-pooled {s // t}x)" if s != t else "") for s, t in recipe.pairs)


def _results_table(results: Results) -> str:
    metrics = sorted({m for row in results.values() for m in row})
    lines = ["| protocol | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for protocol, row in results.items():
        cells = [f"{row[m]:.2f}" if m in row else "" for m in metrics]
        lines.append(f"| {protocol} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_model_card(
    recipe: Recipe,
    params_m: float | None = None,
    sha256: str | None = None,
    results: Results | None = None,
    results_note: str = "",
) -> ModelCard:
    """The README.md for one exported checkpoint: HF metadata plus details, usage, recipe, results, citation."""
    data = ModelCardData(
        library_name="timm",
        license=recipe.license,
        tags=["image-feature-extraction", "timm", "dreamteacher", "self-supervised"],
        datasets=[recipe.data.hub_dataset] if recipe.data.hub_dataset else None,
        pipeline_tag="image-feature-extraction",
    )
    details = [
        f"- **Model type:** image feature backbone ({recipe.arch}, headless: `num_classes=0`)",
        "- **Pretraining:** DreamTeacher feature distillation from a frozen diffusion model, no labels",
        f"- **Pretrain dataset:** {recipe.data.name}",
        f"- **Image size:** {recipe.data.input_size[1]} x {recipe.data.input_size[2]}",
        f"- **Weights:** {recipe.status}",
        f"- **Papers:** [{PAPER_ID}]({PAPER_URL})",
        f"- **Original:** {CODE_URL}",
    ]
    if params_m is not None:
        details.insert(1, f"- **Params (M):** {params_m:.1f}")
    if sha256:
        details.append(f"- **model.safetensors sha256:** `{sha256}`")
    if recipe.notes:
        details.append(f"- **Notes:** {recipe.notes}")
    recipe_table = "\n".join(["| setting | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in _recipe_rows(recipe)])
    if results:
        results_text = _results_table(results) + (f"\n\n{results_note}" if results_note else "")
    else:
        results_text = "No downstream results have been measured for these weights yet."
    body = f"""---
{data.to_yaml()}
---
# Model card for {recipe.name}

A {recipe.arch} backbone pretrained with DreamTeacher ({PAPER_ID}): the multi-scale features of a frozen
diffusion model are regressed by the backbone through an FPN + PPM feature regressor (MSE + attention
transfer). The regressor is discarded after pretraining; these are the backbone's weights only.

## Model Details
{chr(10).join(details)}

## Model Usage
```python
import timm

# 1. from the Hub, with nothing but timm installed
model = timm.create_model("hf-hub:{recipe.hub_id}", pretrained=True)
# 2. by name, after `pip install dreamteacher-models`
import dreamteacher_models  # registers the DreamTeacher tags with timm
model = timm.create_model("{recipe.name}", pretrained=True, num_classes=10)  # fresh head to fine-tune
features = timm.create_model("{recipe.name}", pretrained=True, features_only=True)
# 3. weights you trained and exported yourself
model = timm.create_model("local-dir:path/to/export", pretrained=True)

data_config = timm.data.resolve_data_config({{}}, model=model)
transform = timm.data.create_transform(**data_config, is_training=False)
```

## Training Recipe
Reproduce with `accelerate launch training/pretrain.py --recipe {recipe.name}` from {CODE_URL}.

{recipe_table}

## Results
{results_text}

## Citation
```bibtex
{CITATION}
```
"""
    return ModelCard(body)
