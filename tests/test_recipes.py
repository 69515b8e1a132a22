"""Recipe overrides (`--set field=value`) and recipe.json round trips are checked against each field's type."""

import json

import pytest

from dreamteacher_models.recipes import RECIPES, apply_overrides, get_recipe, recipe_from_dict

FMNIST = get_recipe("resnet18.dreamteacher_fmnist")


@pytest.mark.parametrize(("assignment", "message"), [
    ("data.hflip=no", r"data\.hflip='no' is not a bool \(True or False\)"),
    ("teacher.timestep=50.7", r"teacher\.timestep=50\.7 is not an int"),
    ("optim.optimizer='sgd'", r"optim\.optimizer='sgd' is not one of 'lamb', 'adamw'"),
    ("pairs=((4,4),(8,))", r"pairs\[1\]=\(8,\) is not a tuple of 2"),
    ("data.input_size=(3,32)", r"data\.input_size=\(3, 32\) is not a tuple of 3"),
    ("optim.grad_clip='off'", r"optim\.grad_clip='off' is not a number or None"),
    ("optim.lr='fast'", r"optim\.lr='fast' is not a number$"),
    ("teacher.source=5", r"teacher\.source=5 is not a string$"),
    ("data.input_size=[3, 'a', 32]", r"data\.input_size\[1\]='a' is not an int$"),
    ("ppm_bins=1", r"ppm_bins=1 is not a tuple of an int \(e\.g\. \(1, 2\)\)$"),
    ("data.input_size=1", r"data\.input_size=1 is not a tuple of 3: \(an int, an int, an int\)$"),
])
def test_a_value_of_the_wrong_type_is_refused_naming_field_and_type(assignment, message):
    with pytest.raises(ValueError, match=message):
        apply_overrides(FMNIST, [assignment])


def test_well_typed_values_apply_and_ints_become_floats():
    r = apply_overrides(FMNIST, ["data.hflip=False", "optim.lr=1", "pairs=((4,4),(16,8))", "teacher.resolution=None",
                                 "zero_init_last=false"])
    assert r.data.hflip is False and r.optim.lr == 1.0 and isinstance(r.optim.lr, float)
    assert r.pairs == ((4, 4), (16, 8)) and r.teacher.resolution is None and r.zero_init_last is False


@pytest.mark.parametrize(("raw", "value"), [("true", True), ("TRUE", True), ("none", None), ("Null", None),
                                            ("False", False), ("runs/teacher", "runs/teacher")])
def test_override_values_read_json_and_python_literals(raw, value):
    if isinstance(value, bool):
        assert apply_overrides(FMNIST, [f"data.hflip={raw}"]).data.hflip is value
    else:  # a str | None field: JSON's null and Python's None, any case; anything else stays a string
        assert apply_overrides(FMNIST, [f"label_distill.interpreter={raw}"]).label_distill.interpreter == value


def test_an_override_value_may_contain_an_equals_sign():
    assert apply_overrides(FMNIST, ["teacher.source=runs/a=b"]).teacher.source == "runs/a=b"


@pytest.mark.parametrize("assignment", ["optim.bogus=1", "bogus.lr=1", "optim=1", "no_equals_sign"])
def test_an_unknown_field_is_refused_listing_the_known_ones(assignment):
    with pytest.raises(ValueError, match=r"unknown recipe field .*known fields: arch, tag, teacher\.|field=value"):
        apply_overrides(FMNIST, [assignment])


def test_a_recipe_json_with_an_unknown_field_is_refused_by_its_path():
    values = FMNIST.to_dict()
    values["optim"]["momentum"] = 0.9
    with pytest.raises(ValueError, match=r"unknown recipe field\(s\) \['optim\.momentum'\]"):
        recipe_from_dict(values)
    values = FMNIST.to_dict()
    values["momentum"] = 0.9
    with pytest.raises(ValueError, match=r"unknown recipe field\(s\) \['momentum'\]"):
        recipe_from_dict(values)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_json_round_trip_is_exact(name):
    recipe = get_recipe(name)
    assert recipe_from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe
