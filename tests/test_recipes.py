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
])
def test_a_value_of_the_wrong_type_is_refused_naming_field_and_type(assignment, message):
    with pytest.raises(ValueError, match=message):
        apply_overrides(FMNIST, [assignment])


def test_well_typed_values_apply_and_ints_become_floats():
    r = apply_overrides(FMNIST, ["data.hflip=False", "optim.lr=1", "pairs=((4,4),(16,8))", "teacher.resolution=None",
                                 "zero_init_last=false"])
    assert r.data.hflip is False and r.optim.lr == 1.0 and isinstance(r.optim.lr, float)
    assert r.pairs == ((4, 4), (16, 8)) and r.teacher.resolution is None and r.zero_init_last is False


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_json_round_trip_is_exact(name):
    recipe = get_recipe(name)
    assert recipe_from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe
