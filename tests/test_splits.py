from fractions import Fraction

import pytest

from tfgan_ct.data import splits


def test_ratio_counts_match_paper():
    patients = [f"patient-{i}" for i in range(9)]
    mapping = splits.assign_by_ratio(patients, "4:2:3", salt="s")
    counts = {s: list(mapping.values()).count(s) for s in splits.SPLITS}
    assert counts == {"train": 4, "validation": 2, "test": 3}


def test_fractions_and_small_cohorts():
    assert splits.parse_ratio("0.6:0.2:0.2") == (Fraction(3, 5), Fraction(1, 5), Fraction(1, 5))
    assert splits.apportion(3, splits.parse_ratio("4:2:3")) == [1, 1, 1]
    assert splits.apportion(10, splits.parse_ratio("1:0:0")) == [10, 0, 0]
    assert sum(splits.apportion(7, splits.parse_ratio("0.7:0.15:0.15"))) == 7


def test_assignment_depends_on_salt_not_on_input_order():
    patients = [f"p{i}" for i in range(20)]
    a = splits.assign_by_ratio(patients, "4:2:3", "seed-0")
    assert a == splits.assign_by_ratio(list(reversed(patients)), "4:2:3", "seed-0")
    assert a != splits.assign_by_ratio(patients, "4:2:3", "seed-1")


@pytest.mark.parametrize("text", ["4:2", "a:b:c", "0:0:0", "-1:1:1"])
def test_bad_ratio(text):
    with pytest.raises(ValueError, match="expected train:validation:test"):
        splits.parse_ratio(text)


def test_csv(tmp_path):
    path = tmp_path / "splits.csv"
    path.write_text("patient,split\nA,train\nB,val\nC,Test\n")
    assert splits.read_split_csv(path) == {"A": "train", "B": "validation", "C": "test"}
    path.write_bytes(b"\xef\xbb\xbfpatient,split\r\nA,train\r\n")  # Excel's "CSV UTF-8": a BOM, CRLF
    assert splits.read_split_csv(path) == {"A": "train"}
    path.write_text("patient,split\nA,train\nA,test\n")
    with pytest.raises(ValueError, match="line 3: a patient is listed in two splits"):
        splits.read_split_csv(path)
    path.write_text("patient,split\nA,holdout\n")
    with pytest.raises(ValueError, match="unknown split 'holdout'"):
        splits.read_split_csv(path)
    path.write_text("id,fold\nA,1\n")
    with pytest.raises(ValueError, match="columns 'patient' and 'split'"):
        splits.read_split_csv(path)


def test_salted_hash_is_keyed():
    assert splits.salted_hash("x", "a") != splits.salted_hash("x", "b")
    assert len(splits.salted_hash("x", "a")) == 16
