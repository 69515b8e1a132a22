"""Contract tests: our tags sit in timm's registry beside timm's own, without disturbing them."""

import copy
import dataclasses
import subprocess
import sys
import textwrap
import types

import pytest
import timm
import torch
from timm.models import _registry

import dreamteacher_models
from dreamteacher_models import RECIPES, WeightsNotAvailableError, get_recipe, list_recipes
from dreamteacher_models._timm_registry import TimmRegistryChanged, hub_offline, pretrained_cfg_for, register_recipes
from dreamteacher_models.recipes import CODE_URL, UnknownRecipeError


def test_every_recipe_is_listed_by_timm():
    assert timm.list_pretrained("*dreamteacher*") == sorted(RECIPES)
    assert set(timm.list_models(pretrained=True)) >= set(RECIPES)
    for name in RECIPES:
        assert timm.is_model_pretrained(name)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_pretrained_cfg_comes_from_the_recipe(name):
    recipe = get_recipe(name)
    cfg = timm.models.get_pretrained_cfg(name)
    assert cfg.hf_hub_id == recipe.hub_id and cfg.hf_hub_filename == "model.safetensors"
    assert cfg.num_classes == 0
    assert tuple(cfg.input_size) == recipe.data.input_size
    assert tuple(cfg.mean) == recipe.data.mean and tuple(cfg.std) == recipe.data.std
    assert cfg.crop_pct == recipe.data.crop_pct and cfg.interpolation == recipe.data.interpolation
    assert cfg.license == recipe.license and cfg.paper_ids == "arXiv:2307.07487"
    assert cfg.architecture == recipe.arch and cfg.tag == recipe.tag and cfg.url is None and cfg.file is None
    assert cfg.paper_name == "DreamTeacher: Pretraining Image Backbones with Deep Generative Models"
    assert cfg.origin_url == CODE_URL and cfg.description == f"DreamTeacher-distilled {recipe.arch} " \
        f"({recipe.data.name}, no labels)"
    timm_default = timm.models.get_pretrained_cfg(recipe.arch)  # architecture facts come from timm's own default
    assert (cfg.first_conv, cfg.classifier, cfg.pool_size) == (timm_default.first_conv, timm_default.classifier,
                                                                timm_default.pool_size)
    assert pretrained_cfg_for(recipe) == cfg  # what registration stored is what the function builds now


def test_timm_own_tags_and_defaults_are_unchanged():
    """Snapshot timm's registry in a fresh interpreter before and after importing our package."""
    script = textwrap.dedent(
        """
        import json, timm
        from timm.models import get_pretrained_cfg
        def snapshot():
            out = {}
            for arch in ("resnet18", "resnet50", "convnext_base"):
                tags = [n for n in timm.list_pretrained(arch + ".*") if "dreamteacher" not in n]
                out[arch] = {"tags": tags, "default": get_pretrained_cfg(arch).to_dict(),
                             "first": timm.models._registry._model_default_cfgs[arch].tags[0]}
            return out
        before = snapshot()
        import dreamteacher_models
        after = snapshot()
        print(json.dumps(before == after))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "true", result.stderr


def test_timm_own_weights_still_resolve_to_timm():
    cfg = timm.models.get_pretrained_cfg("resnet50.a1_in1k")
    assert cfg.hf_hub_id == "timm/resnet50.a1_in1k" and cfg.num_classes == 1000
    model = timm.create_model("resnet50")  # architecture default: 1000 classes, timm's head
    assert model.num_classes == 1000 and model.pretrained_cfg["tag"] == "a1_in1k"


def test_registration_is_idempotent():
    before = list(_registry._model_with_tags["resnet50"])
    register_recipes(RECIPES.values())
    assert _registry._model_with_tags["resnet50"] == before
    assert _registry._model_default_cfgs["resnet50"].tags.count("dreamteacher_in1k") == 1


def test_changed_timm_internals_fail_loudly(monkeypatch):
    monkeypatch.delattr(_registry, "_model_has_pretrained")
    monkeypatch.delattr(_registry, "_model_with_tags")
    with pytest.raises(TimmRegistryChanged, match="no longer has _model_has_pretrained, _model_with_tags in"):
        register_recipes(RECIPES.values())


@pytest.mark.parametrize("changed", ["no cfgs", "another type"])
def test_a_changed_default_cfg_fails_loudly(monkeypatch, changed):
    if changed == "no cfgs":
        cfg = copy.deepcopy(_registry._model_default_cfgs["resnet50"])
        del cfg.cfgs
    else:
        cfg = types.SimpleNamespace(tags=[], cfgs={})
    monkeypatch.setitem(_registry._model_default_cfgs, "resnet50", cfg)
    with pytest.raises(TimmRegistryChanged, match="DefaultCfg .* changed shape"):
        register_recipes(RECIPES.values())


def test_registering_a_recipe_fills_every_registry_structure_and_guards_once(monkeypatch):
    for name in ("_model_entrypoints", "_model_pretrained_cfgs", "_model_has_pretrained", "_model_with_tags",
                 "_model_default_cfgs"):
        monkeypatch.setattr(_registry, name, copy.deepcopy(getattr(_registry, name)))
    plain = _registry._model_entrypoints["resnet34"]
    first_tag = _registry._model_default_cfgs["resnet34"].tags[0]
    recipe = dataclasses.replace(get_recipe("resnet18.dreamteacher_fmnist"), arch="resnet34")
    register_recipes([recipe])
    register_recipes([recipe])  # idempotent
    default_cfg = _registry._model_default_cfgs["resnet34"]
    assert default_cfg.tags[0] == first_tag and default_cfg.tags[-1] == recipe.tag
    assert default_cfg.tags.count(recipe.tag) == 1
    assert default_cfg.cfgs[recipe.tag] == pretrained_cfg_for(recipe) == _registry._model_pretrained_cfgs[recipe.name]
    assert recipe.name in _registry._model_has_pretrained
    assert _registry._model_with_tags["resnet34"].count(recipe.name) == 1
    guarded = _registry._model_entrypoints["resnet34"]
    assert guarded is not plain and guarded.__wrapped__ is plain and guarded._dreamteacher_guarded is True
    assert guarded._dreamteacher_recipes == {recipe.tag: recipe}
    with pytest.raises(WeightsNotAvailableError, match="resnet34.dreamteacher_fmnist"):
        timm.create_model(recipe.name, pretrained=True)


@pytest.mark.parametrize(("value", "offline"), [("1", True), ("ON", True), ("yes", True), (" True ", True),
                                                ("0", False), ("", False), ("false", False), ("off", False)])
def test_hub_offline_reads_huggingface_hubs_truthy_values(monkeypatch, value, offline):
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert hub_offline() is offline
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert hub_offline() is False


def test_unknown_recipe_lists_the_known_ones():
    with pytest.raises(UnknownRecipeError) as error:
        get_recipe("resnet50.dreamteacher_in22k")
    assert "resnet50.dreamteacher_in22k" in str(error.value)
    assert ", ".join(list_recipes()) in str(error.value)
    assert get_recipe("hf-hub:dreamteacher/resnet50.dreamteacher_in1k").name == "resnet50.dreamteacher_in1k"
    assert list_recipes("resnet*") == ["resnet18.dreamteacher_fmnist", "resnet50.dreamteacher_in1k"]


def test_unknown_dreamteacher_tag_lists_the_known_ones():
    with pytest.raises(UnknownRecipeError, match="dreamteacher_in22k.*resnet50.dreamteacher_in1k"):
        timm.create_model("resnet50.dreamteacher_in22k")


def test_unpublished_weights_error_is_actionable_and_immediate(tmp_path):
    with pytest.raises(WeightsNotAvailableError) as error:
        timm.create_model("resnet50.dreamteacher_in1k", pretrained=True, cache_dir=tmp_path)
    message = str(error.value)
    assert "dreamteacher/resnet50.dreamteacher_in1k" in message  # the repo id
    assert "not published" in message
    assert "accelerate launch training/pretrain.py --recipe resnet50.dreamteacher_in1k" in message
    assert "local-dir:" in message


def test_published_weights_offline_without_cache_error(tmp_path, monkeypatch):
    recipe = dataclasses.replace(get_recipe("resnet18.dreamteacher_fmnist"), status="published")
    monkeypatch.setitem(_registry._model_entrypoints["resnet18"]._dreamteacher_recipes, recipe.tag, recipe)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotAvailableError, match=r"are published at .*could not be loaded \(offline with no "
                                                       r"cached copy, or the Hub could not be reached\)"):
        timm.create_model(recipe.name, pretrained=True, cache_dir=tmp_path)


def test_plain_architecture_calls_pass_through():
    model = timm.create_model("resnet18", num_classes=3)
    assert model.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 3)
    assert _registry._model_entrypoints["resnet18"].__name__ == "resnet18"


def test_import_stays_light():
    script = "import sys, dreamteacher_models; print(sorted(m for m in ('diffusers', 'accelerate', 'datasets') " \
             "if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
    assert dreamteacher_models.__version__


@pytest.fixture
def online_but_no_network(monkeypatch):
    """HF_HUB_OFFLINE unset, every way out recorded and refused: what a connected user's machine would try."""
    import socket

    import timm.models._hub as timm_hub

    attempts = []

    def refuse_connect(sock, address, *args):
        attempts.append(("connect", address))
        raise OSError(f"test: no network ({address})")

    def refuse_download(repo_id, filename=None, **kwargs):
        attempts.append(("hf_hub_download", repo_id, filename))
        raise OSError(f"test: no network ({repo_id}/{filename})")

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(socket.socket, "connect", refuse_connect)
    monkeypatch.setattr(timm_hub, "hf_hub_download", refuse_download)
    return attempts


def test_online_unpublished_weights_are_asked_of_the_hub_so_they_load_the_day_they_appear(tmp_path,
                                                                                          online_but_no_network):
    recipe = get_recipe("resnet50.dreamteacher_in1k")
    with pytest.raises(WeightsNotAvailableError, match=r"(?s)not published.*Cause: test: no network"):
        timm.create_model(recipe.name, pretrained=True, cache_dir=tmp_path)
    assert online_but_no_network == [("hf_hub_download", recipe.hub_id, "model.safetensors")]


@pytest.fixture
def hub_without_the_files(monkeypatch):
    """Online, and the Hub answers every download with huggingface_hub's own not-found error (mocked)."""
    import timm.models._hub as timm_hub
    from huggingface_hub.errors import EntryNotFoundError

    def not_there(repo_id, filename=None, **kwargs):
        raise EntryNotFoundError(f"404: {repo_id} has no {filename}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(timm_hub, "hf_hub_download", not_there)
    return EntryNotFoundError


def test_the_hubs_not_found_answer_becomes_our_message(tmp_path, hub_without_the_files):
    with pytest.raises(WeightsNotAvailableError, match=r"(?s)not published yet .*accelerate launch training/pretrain"
                                                       r".*Cause: 404: dreamteacher/resnet50\.dreamteacher_in1k has no "
                                                       r"model\.safetensors"):
        timm.create_model("resnet50.dreamteacher_in1k", pretrained=True, cache_dir=tmp_path)


def test_weights_present_on_the_hub_load_although_this_release_calls_them_unpublished(tmp_path, monkeypatch):
    recipe = get_recipe("resnet18.dreamteacher_fmnist")
    assert recipe.status == "unpublished"
    trained = timm.create_model("resnet18", num_classes=0)
    timm.models.save_for_hf(trained, tmp_path / "published", safe_serialization=True)  # what the Hub now holds
    downloads = []
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    import timm.models._hub as timm_hub

    def download(repo_id, filename=None, **kwargs):
        downloads.append((repo_id, filename))
        return str(tmp_path / "published" / filename)

    monkeypatch.setattr(timm_hub, "hf_hub_download", download)
    model = timm.create_model(recipe.name, pretrained=True, cache_dir=tmp_path)
    assert downloads == [(recipe.hub_id, "model.safetensors")]
    assert torch.equal(model.state_dict()["conv1.weight"], trained.state_dict()["conv1.weight"])


def test_the_message_names_an_export_of_the_recipe_trained_here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    export = tmp_path / "runs" / "resnet18.dreamteacher_fmnist" / "export"
    export.mkdir(parents=True)
    (export / "model.safetensors").write_bytes(b"")
    with pytest.raises(WeightsNotAvailableError, match=r"An export of resnet18\.dreamteacher_fmnist trained here "
                                                       r"exists; load it with\n  timm\.create_model\('local-dir:runs/"
                                                       r"resnet18\.dreamteacher_fmnist/export', pretrained=True\)"):
        timm.create_model("resnet18.dreamteacher_fmnist", pretrained=True, cache_dir=tmp_path)


def test_online_published_weights_are_fetched_from_the_recipes_repo(tmp_path, monkeypatch, online_but_no_network):
    recipe = dataclasses.replace(get_recipe("resnet18.dreamteacher_fmnist"), status="published")
    monkeypatch.setitem(_registry._model_entrypoints["resnet18"]._dreamteacher_recipes, recipe.tag, recipe)
    with pytest.raises(WeightsNotAvailableError, match="Cause: test: no network"):
        timm.create_model(recipe.name, pretrained=True, cache_dir=tmp_path)
    assert online_but_no_network == [("hf_hub_download", recipe.hub_id, "model.safetensors")]


def test_an_hf_hub_name_of_our_repo_without_weights_gets_our_message(tmp_path, hub_without_the_files):
    """timm reads an `hf-hub:` repo's config.json before any entrypoint runs; our repos' not-found is ours."""
    with pytest.raises(WeightsNotAvailableError, match=r"(?s)resnet50\.dreamteacher_in1k are not published yet.*"
                                                       r"Cause: 404: dreamteacher/resnet50\.dreamteacher_in1k has no "
                                                       r"config\.json"):
        timm.create_model("hf-hub:dreamteacher/resnet50.dreamteacher_in1k", pretrained=True, cache_dir=tmp_path)
    with pytest.raises(hub_without_the_files, match="someone/else has no config.json"):  # other repos: timm's own path
        timm.create_model("hf-hub:someone/else", pretrained=True, cache_dir=tmp_path)
