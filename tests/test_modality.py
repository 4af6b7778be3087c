import pydicom
import pytest

from tfgan_ct.config import ModalityRules
from tfgan_ct.data import convert, dicom_io, modality
from tfgan_ct.data.dicom_io import Frame

LEGACY = "dicom/legacy/DICOMSamples_CT_Implicit_Little_Headless_Retired.dcm"


def frame(position=0.0, time=0.0, description="", agent="", thickness=5.0):
    return Frame(path="x", frame=0, instance_uid="u", patient="p", series="s", position=position,
                 time=time, instance=0, rows=8, columns=8, pixel_spacing=None,
                 slice_thickness=thickness, description=description.upper(), contrast_agent=agent)


def test_ctp_by_repeated_positions():
    frames = [frame(position=z, time=t) for t in range(5) for z in (0.0, 5.0)]
    kind, reason = modality.classify(frames, ModalityRules())
    assert kind == "ctp" and "5 acquisitions" in reason


def test_cta_needs_hint_and_thin_slices():
    rules = ModalityRules()
    assert modality.classify([frame(description="CTA head", thickness=0.625)], rules)[0] == "cta"
    assert modality.classify([frame(agent="IOPAMIDOL", thickness=1.0)], rules)[0] == "cta"
    assert modality.classify([frame(agent="IOPAMIDOL", thickness=5.0)], rules)[0] == "ncct"
    assert modality.classify([frame(description="OCTAVE", thickness=0.6)], rules)[0] == "ncct"
    assert modality.classify([frame(agent="NONE", thickness=0.6)], rules)[0] == "ncct"


def test_rules_come_from_config():
    rules = ModalityRules(ctp_min_timepoints=10)
    frames = [frame(position=0.0, time=t) for t in range(5)]
    assert modality.classify(frames, rules)[0] == "ncct"


def copies(tmp_path, source, count, change):
    """Header pass over `count` copies of the real file `source`; `change(ds, i)` edits copy i."""
    frames = []
    for i in range(count):
        ds = pydicom.dcmread(source, force=True)
        change(ds, i)
        ds.save_as(tmp_path / f"{i:02d}.dcm")
        frames += dicom_io.frames_of(tmp_path / f"{i:02d}.dcm")
    return frames


@pytest.mark.parametrize("retired_position", [True, False])
def test_copies_of_one_slice_are_not_ctp(tmp_path, shared_data, retired_position):
    """Twenty copies of a slice (InstanceNumber 1..20, same time), with the retired
    ImagePosition only, or with no position at all: one slice repeated, not perfusion."""
    def change(ds, i):
        ds.InstanceNumber = i + 1
        if not retired_position:
            del ds[0x00200030]

    frames = copies(tmp_path, shared_data / LEGACY, 20, change)
    assert all((f.position is None) != retired_position for f in frames)
    kind, reason = modality.classify(frames, ModalityRules())
    assert kind == "ncct", reason
    if retired_position:  # repeated at one position without distinct times: the reason says how to force CTP
        assert "without distinct acquisition times" in reason and "--modality ctp" in reason


def test_unknown_positions_are_ordered_by_instance_number(tmp_path, shared_data, small_cfg):
    def change(ds, i):
        ds.InstanceNumber = 5 - i  # file order is the reverse of InstanceNumber
        del ds[0x00200030]

    frames = copies(tmp_path, shared_data / LEGACY, 5, change)
    plans = convert.plan_series(frames, small_cfg, "auto", "salt", None)
    assert len(plans) == 1 and plans[0].modality == "ncct"
    assert [f.instance for f in plans[0].frames] == [1, 2, 3, 4, 5]


def test_known_positions_first_then_unknown_ones_by_instance_number(tmp_path, shared_data, small_cfg):
    """A series mixing slices with and without a position sorts (None and floats do not compare)."""
    def change(ds, i):
        ds.InstanceNumber = 5 - i
        if i % 2:
            del ds[0x00200030]
        else:
            ds[0x00200030].value = [0.0, 0.0, 10.0 * (5 - i)]

    frames = copies(tmp_path, shared_data / LEGACY, 5, change)
    plans = convert.plan_series(frames, small_cfg, "auto", "salt", None)
    assert [(f.position, f.instance) for f in plans[0].frames] == [
        (10.0, 1), (30.0, 3), (50.0, 5), (None, 2), (None, 4)]


def test_same_position_at_different_times_is_ctp(tmp_path, shared_data):
    """A CTP-like series made of a real slice: one table position, a new time each copy."""
    def change(ds, i):
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.InstanceNumber = i + 1
        ds.AcquisitionTime = ds.ContentTime = f"1200{2 * i:02d}.000"

    frames = copies(tmp_path, shared_data / "dicom/head-ncct/pydicom-data_693_UNCR.dcm", 5, change)
    assert len({f.position for f in frames}) == 1 and len({f.time for f in frames}) == 5
    kind, reason = modality.classify(frames, ModalityRules())
    assert kind == "ctp" and "5 acquisitions" in reason
