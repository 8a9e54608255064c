"""Label files: duplicated columns/keys, non-finite values, unknown names are errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
from _spacehelpers import random_models

from w2wkit.errors import DirectionError, SpaceError
from w2wkit.labels import read_labels
from w2wkit.space import WeightSpace

NAMES = ["m0", "m1", "m2"]


def _write(tmp_path, name, text):
    f = tmp_path / name
    f.write_text(text)
    return f


def test_a_duplicated_csv_column_is_an_error(tmp_path):
    f = _write(tmp_path, "l.csv", "file,beard,age,beard\nm0,1,2,0\nm1,0,3,1\n")
    with pytest.raises(DirectionError) as info:
        read_labels(f, NAMES)
    msg = str(info.value)
    assert str(f) in msg and "column 'beard' appears twice" in msg and "columns 2 and 4" in msg


@pytest.mark.parametrize(
    "text",
    [
        '{"m0": {"beard": 1, "beard": 0}}',
        '{"m0": {"beard": 1}, "m0": {"beard": 0}}',
        '[{"file": "m0", "beard": 1, "beard": 0}]',
    ],
)
def test_a_repeated_json_key_is_an_error(tmp_path, text):
    f = _write(tmp_path, "l.json", text)
    with pytest.raises(DirectionError, match=r"l\.json: .* the key '(beard|m0)' twice"):
        read_labels(f, NAMES)


@pytest.mark.parametrize("value", ["inf", "-inf", "Infinity", "1e400", "-nan"])
def test_non_finite_csv_values_are_errors(tmp_path, value):
    f = _write(tmp_path, "l.csv", f"file,beard\nm0,1\nm1,{value}\n")
    with pytest.raises(DirectionError) as info:
        read_labels(f, NAMES)
    msg = str(info.value)
    assert str(f) in msg and "row 'm1', column 'beard'" in msg and repr(value) in msg


@pytest.mark.parametrize("value", ["Infinity", "NaN", "1e400"])
def test_non_finite_json_numbers_are_errors(tmp_path, value):
    f = _write(tmp_path, "l.json", '{"m0": {"beard": 1}, "m1": {"beard": ' + value + "}}")
    with pytest.raises(DirectionError, match=r"l\.json: label JSON is not valid JSON"):
        read_labels(f, NAMES)


def test_deeply_nested_json_is_one_error(tmp_path):
    f = _write(tmp_path, "l.json", '{"m0": {"beard": ' + "[" * 50_000 + "]" * 50_000 + "}}")
    with pytest.raises(DirectionError, match="nested"):
        read_labels(f, NAMES)


def test_missing_values_still_read_as_nan(tmp_path):
    f = _write(tmp_path, "l.csv", "file,beard,age\nm0,,NA\nm1,nan,null\nm2,1,?\n")
    out = read_labels(f, NAMES)
    assert np.isnan(out["beard"][:2]).all() and out["beard"][2] == 1
    assert np.isnan(out["age"]).all()
    g = _write(tmp_path, "l.json", '{"m0": {"beard": null}, "m1": {"beard": "NA"}}')
    assert np.isnan(read_labels(g, NAMES)["beard"]).all()


def test_unknown_names_are_named(tmp_path):
    f = _write(tmp_path, "l.csv", "file,beard\nm0,1\nstranger,0\n")
    with pytest.raises(DirectionError, match=r"l\.csv: 1 label row\(s\) name models not.*stranger"):
        read_labels(f, NAMES)


def test_fit_refuses_infinite_labels_given_as_arrays():
    models = random_models(4, seed=0)
    with pytest.raises(SpaceError, match=r"parameter labels: label 'beard' of model 2 is inf"):
        WeightSpace(2).fit(models, labels={"beard": [0, 1, math.inf, 0]})
    space = WeightSpace(2).fit(models, labels={"beard": [0, 1, math.nan, 0]})  # NaN = missing
    assert np.isnan(space.labels_["beard"][2])
