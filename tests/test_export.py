"""Export -> load round trips through every route timm offers, for every recipe."""

import json
import os

import pytest
import safetensors.torch
import timm
import torch

from dreamteacher_models import RECIPES, get_recipe
from hub.export import _check_no_pickles, export_for_hub
from hub.export import main as export_main
from hub.publish import check_export, publish
from tests.hub_cache import populate_hf_cache
from training.run.backbones import build_backbone, load_student, student_state_dict
from training.run.checksums import read_checksums, sha256_file


def _trained_student(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_backbone(get_recipe(name))
    with torch.no_grad():  # move BN statistics away from their init so a missed buffer shows
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _probe(name: str) -> torch.Tensor:
    size = min(get_recipe(name).data.input_size[1], 64)
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def _export(name, tmp_path_factory):
    model = _trained_student(name)
    checkpoint = {f"student.{k}": v for k, v in model.state_dict().items()}
    checkpoint["regressor.lateral.0.weight"] = torch.zeros(4, 4)  # must be dropped
    folder = export_for_hub(checkpoint, tmp_path_factory.mktemp(name) / "export", recipe=name)
    return name, model, folder


@pytest.fixture(scope="module", params=sorted(RECIPES))
def exported_each(request, tmp_path_factory):
    """(name, trained model, export folder) for every recipe; the trainer's checkpoint layout is the input."""
    return _export(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The same for one small recipe, for the checks that do not depend on the architecture."""
    return _export("resnet18.dreamteacher_fmnist", tmp_path_factory)


def test_export_folder_is_student_only_timm_format(exported_each):
    name, model, folder = exported_each
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "SHA256SUMS", "config.json", "model.safetensors",
                                                       "recipe.json"]
    weights = safetensors.torch.load_file(folder / "model.safetensors")
    assert set(weights) == set(model.state_dict())  # timm key names, no regressor or teacher tensors
    config = json.loads((folder / "config.json").read_text())
    recipe = get_recipe(name)
    assert config["architecture"] == recipe.arch and config["num_classes"] == 0
    assert config["pretrained_cfg"]["tag"] == recipe.tag
    assert tuple(config["pretrained_cfg"]["mean"]) == recipe.data.mean
    assert tuple(config["pretrained_cfg"]["input_size"]) == recipe.data.input_size


def test_model_card_metadata_and_sections(exported):
    name, _, folder = exported
    card = (folder / "README.md").read_text()
    assert "library_name: timm" in card and "image-feature-extraction" in card
    assert f"license: {get_recipe(name).license}" in card
    for section in ("## Model Details", "## Model Usage", "## Training Recipe", "## Results", "## Citation"):
        assert section in card
    for route in (f'"hf-hub:{get_recipe(name).hub_id}"', f'"{name}"', '"local-dir:'):
        assert route in card
    sums = read_checksums(folder)
    assert sorted(sums) == ["README.md", "config.json", "model.safetensors", "recipe.json"]
    assert sums["model.safetensors"] in card
    assert all(sums[name] == sha256_file(folder / name) for name in sums)


def test_registered_name_loads_export_via_file_overlay(exported_each):
    name, model, folder = exported_each
    overlay = dict(file=str(folder / "model.safetensors"))
    loaded = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay)
    x = _probe(name)
    assert torch.equal(loaded.eval()(x), model(x))


def test_registered_name_loads_through_the_hub_cache(exported_each, tmp_path):
    name, model, folder = exported_each
    populate_hf_cache(tmp_path, get_recipe(name).hub_id, folder)
    loaded = timm.create_model(name, pretrained=True, cache_dir=tmp_path)
    x = _probe(name)
    assert torch.equal(loaded.eval()(x), model(x))


def test_hf_hub_route_needs_no_dreamteacher_registration(exported, tmp_path):
    name, model, folder = exported
    populate_hf_cache(tmp_path, "someone/my-dreamteacher", folder)
    loaded = timm.create_model("hf-hub:someone/my-dreamteacher", pretrained=True, cache_dir=tmp_path)
    x = _probe(name)
    assert torch.equal(loaded.eval()(x), model(x))


def test_local_dir_route_and_data_config(exported):
    name, model, folder = exported
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    x = _probe(name)
    assert torch.equal(loaded(x), model(x))
    data = get_recipe(name).data
    cfg = timm.data.resolve_data_config({}, model=loaded)
    assert tuple(cfg["input_size"]) == data.input_size
    assert tuple(cfg["mean"]) == data.mean and tuple(cfg["std"]) == data.std
    assert cfg["crop_pct"] == data.crop_pct and cfg["interpolation"] == data.interpolation


def test_features_only_strides_and_channels(exported_each):
    name, model, folder = exported_each
    features = timm.create_model(f"local-dir:{folder}", pretrained=True, features_only=True,
                                 out_indices=(-4, -3, -2, -1))
    assert features.feature_info.reduction() == [4, 8, 16, 32]
    maps = features.eval()(_probe(name))
    assert [m.shape[1] for m in maps] == features.feature_info.channels()
    reference = [info["num_chs"] for info in model.feature_info][-4:]
    assert features.feature_info.channels() == reference


def test_num_classes_gives_a_fresh_head_on_pretrained_trunk(exported):
    name, model, folder = exported
    classifier = timm.create_model(f"local-dir:{folder}", pretrained=True, num_classes=10).eval()
    assert classifier(_probe(name)).shape == (2, 10)
    trunk = {k: v for k, v in classifier.state_dict().items() if k in model.state_dict()}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in trunk.items())


def test_export_rejects_a_mismatched_checkpoint(tmp_path):
    wrong = timm.create_model("resnet18", num_classes=0).state_dict()
    with pytest.raises(ValueError, match="does not match resnet50"):
        export_for_hub(wrong, tmp_path / "out", recipe="resnet50.dreamteacher_in1k")
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_export_cli_from_a_training_run_layout(tmp_path, capsys):
    recipe = get_recipe("resnet18.dreamteacher_fmnist")
    model = _trained_student(recipe.name)
    run = tmp_path / "run"
    (run / "checkpoints" / "step_10").mkdir(parents=True)
    (run / "checkpoints" / "step_9").mkdir()
    (run / "recipe.json").write_text(json.dumps(recipe.to_dict()))
    latest = {f"student.{k}": v.clone() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(latest, run / "checkpoints" / "step_10" / "model.safetensors")
    stale = {k: torch.zeros_like(v) for k, v in latest.items()}
    safetensors.torch.save_file(stale, run / "checkpoints" / "step_9" / "model.safetensors")
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"results": {"linear probe": {"top1": 81.25}}}))
    out = export_main(["--checkpoint", str(run), "--out", str(tmp_path / "export"), "--results", str(results),
                       "--results-note", "measured on a test machine"])
    assert f"exported to {out}: README.md, SHA256SUMS, config.json, model.safetensors, recipe.json" in \
        capsys.readouterr().out
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = _probe(recipe.name)
    assert torch.equal(loaded(x), model(x))
    card = (out / "README.md").read_text()
    assert "| linear probe | 81.25 |" in card and "measured on a test machine" in card
    assert "- **Params (M):** 11.2" in card  # headless resnet18
    assert (out / "recipe.json").read_text() == json.dumps(recipe.to_dict(), indent=2) + "\n"
    bare = export_main(["--checkpoint", str(run), "--out", str(tmp_path / "bare"), "--recipe", recipe.name])
    assert "| linear probe |" not in (bare / "README.md").read_text()
    for incomplete in (["--checkpoint", str(run)], ["--out", str(tmp_path / "x")]):  # both are required
        with pytest.raises(SystemExit):
            export_main(incomplete)


def test_publish_is_a_dry_run_by_default(exported, capsys, monkeypatch):
    _, _, folder = exported
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    assert publish(folder) is None
    output = capsys.readouterr().out
    assert "dry run" in output and "hf_secret_value" not in output
    assert "model.safetensors" in check_export(folder)


def test_publish_refuses_a_tampered_export(exported, tmp_path):
    _, _, folder = exported
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in folder.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    (copy / "config.json").write_text((copy / "config.json").read_text().replace("resnet", "resnot"))
    with pytest.raises(ValueError, match=r"config\.json does not match its SHA256SUMS"):
        publish(copy, repo_id="x/y")
    (copy / "config.json").write_bytes((folder / "config.json").read_bytes())
    (copy / "extra.txt").write_text("not part of the export")
    with pytest.raises(ValueError, match=r"does not list: \['extra\.txt'\]"):
        publish(copy, repo_id="x/y")
    (copy / "extra.txt").unlink()
    (copy / "sub").mkdir()
    with pytest.raises(ValueError, match=r"subfolders \['sub'\]"):
        publish(copy, repo_id="x/y")
    (copy / "sub").rmdir()
    (copy / "SHA256SUMS").write_text("")
    with pytest.raises(ValueError, match="SHA256SUMS is empty"):
        publish(copy, repo_id="x/y")
    (copy / "SHA256SUMS").write_text("nonsense\n")
    with pytest.raises(ValueError, match="line 1 is not"):
        publish(copy, repo_id="x/y")


def test_export_is_readable_by_other_users(exported):
    _, _, folder = exported
    umask = os.umask(0)
    os.umask(umask)
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~umask for p in folder.iterdir())


def test_export_never_deletes_a_users_files(tmp_path):
    """Export replaces a previous export whole, but refuses a folder holding anything else, and changes nothing."""
    weights = {f"student.{k}": v for k, v in _trained_student("resnet18.dreamteacher_fmnist").state_dict().items()}
    target = tmp_path / "out"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    refused = r"refusing to replace .*out: it is not a previous export \(hub/export\.py\) and holds notes\.txt"
    with pytest.raises(FileExistsError, match=refused + ".*nothing was changed"):
        export_for_hub(weights, target, recipe="resnet18.dreamteacher_fmnist")
    assert (target / "notes.txt").read_text() == "mine" and sorted(p.name for p in target.iterdir()) == ["notes.txt"]
    fresh = export_for_hub(weights, tmp_path / "new", recipe="resnet18.dreamteacher_fmnist")
    again = export_for_hub(weights, fresh, recipe="resnet18.dreamteacher_fmnist")  # a previous export: replaced
    assert sorted(p.name for p in again.iterdir()) == ["README.md", "SHA256SUMS", "config.json", "model.safetensors",
                                                       "recipe.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_student_tensors_are_taken_from_a_ddp_wrapped_trainer_checkpoint():
    t, u = torch.zeros(1), torch.ones(1)
    assert student_state_dict({"module.student.conv1.weight": t, "module.regressor.head.0.weight": u}) == \
        {"conv1.weight": t}
    assert student_state_dict({"module.conv1.weight": t}) == {"conv1.weight": t}  # a bare backbone


@pytest.mark.parametrize("change", ["missing", "unexpected", "wrong shape"])
def test_each_kind_of_checkpoint_mismatch_is_refused_by_name(change):
    recipe = get_recipe("resnet18.dreamteacher_fmnist")
    state = dict(build_backbone(recipe).state_dict())
    if change == "missing":
        for key in [k for k in state if k.startswith("layer4.")]:
            del state[key]
        expected = r"missing \['layer4\.0\..*'\] \.\.\. \(\d+\), unexpected \[\] \(0\)"
    elif change == "unexpected":
        state["fc.weight"] = torch.zeros(10, 512)
        expected = r"missing \[\] \(0\), unexpected \['fc\.weight'\] \(1\)"
    else:
        state["conv1.weight"] = torch.zeros(1)
        expected = r"wrong shapes \['conv1\.weight \(1,\) != \(64, 3, 7, 7\)'\] \(1\)"
    with pytest.raises(ValueError, match=expected):
        load_student(recipe, state)


def test_checksum_lines_must_hold_a_sha256_and_may_mark_binary_mode(tmp_path):
    digest = "a" * 64
    (tmp_path / "SHA256SUMS").write_text(f"{digest}  model.safetensors\n{digest} *config.json\n")
    assert read_checksums(tmp_path) == {"model.safetensors": digest, "config.json": digest}
    (tmp_path / "SHA256SUMS").write_text("abc123  model.safetensors\n")
    with pytest.raises(ValueError, match="line 1 is not '<sha256>  <file>'"):
        read_checksums(tmp_path)


@pytest.mark.parametrize("suffix", [".bin", ".pth", ".pt", ".pkl"])
def test_an_export_holding_a_pickle_is_refused(tmp_path, suffix):
    (tmp_path / f"weights{suffix}").write_bytes(b"")
    with pytest.raises(RuntimeError, match=f"pickle files \\['weights\\{suffix}'\\]; only safetensors"):
        _check_no_pickles(tmp_path)


def test_cli_card_equals_the_api_card_and_an_explicit_recipe_wins_over_the_runs(tmp_path):
    recipe = get_recipe("resnet18.dreamteacher_fmnist")
    model = _trained_student(recipe.name)
    run = tmp_path / "run"
    run.mkdir()
    edited = recipe.to_dict()
    edited["optim"]["lr"] = 0.123  # the run's own recipe.json differs from the registered recipe
    (run / "recipe.json").write_text(json.dumps(edited))
    safetensors.torch.save_file(model.state_dict(), run / "model.safetensors")
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"linear probe": {"top1": 81.25}}))

    from_run = export_main(["--checkpoint", str(run), "--out", str(tmp_path / "a"), "--results", str(results)])
    assert json.loads((from_run / "recipe.json").read_text())["optim"]["lr"] == 0.123
    api = export_for_hub(run, tmp_path / "b", results={"linear probe": {"top1": 81.25}})
    assert (from_run / "README.md").read_text() == (api / "README.md").read_text()  # no note unless given
    named = export_main(["--checkpoint", str(run), "--out", str(tmp_path / "c"), "--recipe", recipe.name])
    assert json.loads((named / "recipe.json").read_text()) == json.loads(json.dumps(recipe.to_dict()))


def test_mismatch_lists_and_bad_checksum_lines_are_cut_to_a_readable_length(tmp_path):
    from training.run.backbones import _head

    assert _head([str(i) for i in range(7)]) == "['0', '1', '2', '3', '4', '5'] ... (7)"
    assert _head(list("abcdef")) == "['a', 'b', 'c', 'd', 'e', 'f'] (6)"
    (tmp_path / "SHA256SUMS").write_text("x" * 100 + "\n")
    with pytest.raises(ValueError, match=f"line 1 is not '<sha256>  <file>': '{'x' * 80}'; re-export"):
        read_checksums(tmp_path)


def test_export_refuses_the_current_folder_and_writes_through_a_symlink(tmp_path, monkeypatch):
    weights = {f"student.{k}": v for k, v in _trained_student("resnet18.dreamteacher_fmnist").state_dict().items()}
    monkeypatch.chdir(tmp_path)
    for current in (".", str(tmp_path), ".."):
        with pytest.raises(ValueError, match="is the current folder or holds it.*a folder of its own"):
            export_for_hub(weights, current, recipe="resnet18.dreamteacher_fmnist")
    real = tmp_path / "shared" / "exports"
    real.mkdir(parents=True)
    (tmp_path / "link").symlink_to(real)
    export_for_hub(weights, tmp_path / "link", recipe="resnet18.dreamteacher_fmnist")
    assert (tmp_path / "link").is_symlink() and (real / "model.safetensors").is_file()


def test_a_corrupt_checkpoint_is_a_one_line_error_naming_it(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors file.*corrupt"):
        export_for_hub(bad, tmp_path / "out", recipe="resnet18.dreamteacher_fmnist")
