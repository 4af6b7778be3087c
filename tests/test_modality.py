from tfgan_ct import modality
from tfgan_ct.config import ModalityRules
from tfgan_ct.dicom_io import Frame


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
