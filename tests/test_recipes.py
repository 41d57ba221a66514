"""Recipe loading: validation errors name the key, the type and the nearest valid name; overrides."""

import json
import textwrap

import pytest

from mfcli.config import apply_overrides, load_recipe, parse_override
from mfcli.errors import MFError

BASE = """
[run]
name = "t"
[data]
name = "toy"
distribution = "moons"
batch_size = 64
[backbone]
name = "mlp"
width = 32
[objective]
name = "fm"
[train]
steps = 3
lr = 1e-3
"""


def write(tmp_path, text, name="r.toml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def test_valid_recipe_resolves_defaults(tmp_path):
    r = load_recipe(write(tmp_path, BASE))
    res = r.resolved()
    assert res["data"]["distribution"] == "moons" and res["data"]["batch_size"] == 64
    assert res["backbone"]["width"] == 32 and res["backbone"]["depth"] == 4  # default filled in
    assert res["train"]["steps"] == 3 and res["train"]["lr"] == 1e-3
    assert json.loads(json.dumps(res)) == res  # JSON-able


def test_unknown_key_suggests_nearest(tmp_path):
    with pytest.raises(MFError, match=r"unknown key 'widht'.*Did you mean 'width'"):
        load_recipe(write(tmp_path, BASE.replace("width = 32", "widht = 32")))


def test_wrong_type_names_key_and_expected_type(tmp_path):
    with pytest.raises(MFError, match=r"\[train\] steps: expected int, got str 'many'"):
        load_recipe(write(tmp_path, BASE.replace("steps = 3", 'steps = "many"')))
    with pytest.raises(MFError, match=r"distribution: expected one of .*'checkerboard'"):
        load_recipe(write(tmp_path, BASE.replace('"moons"', '"checkerbord"')))


def test_int_is_accepted_for_float_but_bool_is_not_int(tmp_path):
    r = load_recipe(write(tmp_path, BASE.replace("lr = 1e-3", "lr = 1")))
    assert isinstance(r.train.lr, float) and r.train.lr == 1.0
    with pytest.raises(MFError, match="expected int, got bool"):
        load_recipe(write(tmp_path, BASE.replace("steps = 3", "steps = true")))


def test_unknown_plugin_name_suggests(tmp_path):
    with pytest.raises(MFError, match=r"unknown backbone 'mpl'.*Did you mean 'mlp'"):
        load_recipe(write(tmp_path, BASE.replace('name = "mlp"', 'name = "mpl"')))


def test_unknown_table_and_missing_name(tmp_path):
    with pytest.raises(MFError, match=r"unknown table \[trian\].*Did you mean 'train'"):
        load_recipe(write(tmp_path, BASE.replace("[train]", "[trian]")))
    with pytest.raises(MFError, match=r"\[backbone\] needs name"):
        load_recipe(write(tmp_path, BASE.replace('name = "mlp"\n', "")))


def test_malformed_toml_reports_line_and_column(tmp_path):
    with pytest.raises(MFError, match=r"malformed TOML.*line 6, column 16"):
        load_recipe(write(tmp_path, BASE.replace('distribution = "moons"', "distribution = moons")))


def test_overrides_parse_toml_values_and_fall_back_to_strings(tmp_path):
    assert parse_override("train.steps=20") == (["train", "steps"], 20)
    assert parse_override("train.betas=[0.9, 0.95]") == (["train", "betas"], [0.9, 0.95])
    assert parse_override("data.root=/tmp/x y") == (["data", "root"], "/tmp/x y")
    r = load_recipe(write(tmp_path, BASE), ["train.steps=7", "data.batch_size=16", "backbone.width=8", "train.betas=[0.9,0.95]"])
    assert (r.train.steps, r.loader.batch_size, r.backbone.width, r.train.betas) == (7, 16, 8, [0.9, 0.95])
    assert r.overrides == ["train.steps=7", "data.batch_size=16", "backbone.width=8", "train.betas=[0.9,0.95]"]


def test_override_errors(tmp_path):
    p = write(tmp_path, BASE)
    with pytest.raises(MFError, match="key.sub=value"):
        load_recipe(p, ["trainsteps20"])
    with pytest.raises(MFError, match=r"unknown section 'trian'.*'train'"):
        load_recipe(p, ["trian.steps=2"])
    with pytest.raises(MFError, match=r"unknown key 'step'.*'steps'"):
        load_recipe(p, ["train.step=2"])
    with pytest.raises(MFError, match="expected int"):
        load_recipe(p, ["train.steps=abc"])


def test_apply_overrides_does_not_mutate_input():
    raw = {"train": {"steps": 1}}
    apply_overrides(raw, ["train.steps=5"])
    assert raw == {"train": {"steps": 1}}


def test_shipped_recipes_validate():
    from mfcli.config import recipe_dirs

    from mfcli.compress.recipe import is_compress_recipe, load_compress_recipe
    from mfcli.config import read_toml

    files = [f for d in recipe_dirs() for f in d.glob("*.toml")]
    assert any(f.stem == "quickstart" for f in files)
    for f in files:
        (load_compress_recipe if is_compress_recipe(read_toml(f)) else load_recipe)(f)
