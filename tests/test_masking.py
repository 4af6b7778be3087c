import numpy as np

from tfgan_ct.config import MaskSettings
from tfgan_ct.data import dicom_io
from tfgan_ct.data.masking import apply_mask, brain_mask, largest_component


def synthetic_head(size=256):
    """Air, a skull ring (1000 HU), brain (35 HU) with a ventricle (5 HU) and a vessel (300 HU)."""
    y, x = np.mgrid[:size, :size] - size / 2
    r = np.hypot(x, y)
    hu = np.full((size, size), -1000.0, np.float32)
    hu[r < 0.45 * size] = 40.0   # scalp
    hu[r < 0.42 * size] = 1000.0  # skull
    hu[r < 0.38 * size] = 35.0   # brain
    hu[np.hypot(x - 10, y) < 0.05 * size] = 5.0
    hu[np.hypot(x + 20, y + 20) < 3] = 300.0
    return hu, r


def test_mask_is_brain_without_skull_and_scalp():
    hu, r = synthetic_head()
    mask = brain_mask(hu, (-15, 100), MaskSettings())
    assert mask[r < 0.36 * 256].all()          # brain, ventricle and vessel (hole filled)
    assert not mask[r > 0.40 * 256].any()      # skull, scalp, air


def test_empty_slice_gives_empty_mask():
    hu = np.full((64, 64), -1000.0, np.float32)
    assert not brain_mask(hu, (-15, 100), MaskSettings()).any()


def test_largest_component():
    m = np.zeros((10, 10), bool)
    m[0:2, 0:2] = True
    m[5:9, 5:9] = True
    out = largest_component(m)
    assert out[6, 6] and not out[0, 0]


def test_apply_mask_sets_floor():
    hu, _ = synthetic_head(64)
    mask = brain_mask(hu, (-15, 100), MaskSettings())
    out = apply_mask(hu, mask, floor_hu=0.0)
    assert out.dtype == np.float32
    assert np.all(out[~mask] == 0.0) and np.all(out[mask] == hu[mask])


def test_real_head_slice(shared_data):
    hu = dicom_io.read_hu(str(shared_data / "dicom/head-ncct/pydicom-data_693_UNCR.dcm"), [0], -1500)[0]
    mask = brain_mask(hu, (-15, 100), MaskSettings())
    frac = mask.mean()
    assert 0.2 < frac < 0.5, frac                       # a brain, not the whole head or nothing
    assert np.median(hu[mask]) > 15 and np.median(hu[mask]) < 60  # brain tissue HU
    assert not mask[0].any() and not mask[:, 0].any()   # background corners out


def test_fast_morphology_equals_scipy():
    from scipy import ndimage

    from tfgan_ct.data.masking import dilate, erode, fill_holes

    rng = np.random.default_rng(0)
    m = ndimage.gaussian_filter(rng.random((80, 90)), 2) > 0.5
    cross = ndimage.generate_binary_structure(2, 1)
    for r in (1, 2, 3):
        np.testing.assert_array_equal(erode(m, r), ndimage.binary_erosion(m, cross, iterations=r))
        np.testing.assert_array_equal(dilate(m, r), ndimage.binary_dilation(m, cross, iterations=r))
    np.testing.assert_array_equal(fill_holes(m), ndimage.binary_fill_holes(m))
    y, x = np.mgrid[-2:3, -2:3]
    disk2 = x * x + y * y <= 4
    np.testing.assert_array_equal(dilate(m, 2), ndimage.binary_dilation(m, disk2))


def _reference_mask(hu, hu_range, settings):
    """brain_mask composed plainly from scipy.ndimage (pixel labelling, no cropping)."""
    from scipy import ndimage

    from tfgan_ct.data.masking import scaled_radius

    cross = ndimage.generate_binary_structure(2, 1)
    size = max(hu.shape)
    opening = scaled_radius(settings.opening_radius, size)
    dilation = scaled_radius(settings.dilation_radius, size)
    mask = (hu >= hu_range[0]) & (hu <= hu_range[1])
    if opening:
        mask = ndimage.binary_opening(mask, cross, iterations=opening)
    labels, count = ndimage.label(mask)
    if count == 0:
        return np.zeros(hu.shape, bool)
    mask = labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1
    if settings.fill_holes:
        mask = ndimage.binary_fill_holes(mask)
    if dilation:
        mask = ndimage.binary_dilation(mask, cross, iterations=dilation)
    return mask


def _random_slices(rng):
    """Random HU images: smooth blobs (with holes and several components) and noise."""
    from scipy import ndimage

    for shape in [(128, 128), (96, 130), (40, 40), (17, 33), (5, 3)]:
        for sigma in (0.0, 1.0, 3.0):
            field = rng.normal(size=shape)
            if sigma:
                field = ndimage.gaussian_filter(field, sigma)
                field /= field.std()
            yield (field * 80.0 + 40.0).astype(np.float32)


def test_brain_mask_equals_plain_scipy_composition():
    rng = np.random.default_rng(7)
    settings = [MaskSettings(o, d, f) for o in (0, 4, 8) for d in (0, 4, 8) for f in (True, False)]
    for hu in _random_slices(rng):
        for s in settings:
            np.testing.assert_array_equal(brain_mask(hu, (-15.0, 100.0), s), _reference_mask(hu, (-15.0, 100.0), s))


def test_components_and_holes_equal_scipy_on_random_masks():
    from scipy import ndimage

    from tfgan_ct.data.masking import fill_holes

    rng = np.random.default_rng(8)
    for shape in [(1, 1), (1, 7), (7, 1), (12, 12), (31, 20), (64, 64)]:
        for density in (0.2, 0.45, 0.6, 0.8):
            mask = rng.random(shape) < density
            np.testing.assert_array_equal(fill_holes(mask), ndimage.binary_fill_holes(mask))
            labels, count = ndimage.label(mask)
            # of equal sizes, the component scipy numbers first
            expected = labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1 if count else mask
            np.testing.assert_array_equal(largest_component(mask), expected)


def test_integer_hu_give_the_mask_of_the_same_float_hu():
    """Whole-number HU as int16 (conversion's fast path) are thresholded like the same values as
    float32, also with thresholds that are not whole numbers."""
    hu, _ = synthetic_head()
    hu = hu + np.random.default_rng(0).integers(-20, 20, hu.shape)
    for hu_range in [(-15, 100), (4.5, 35.5), (-15.2, 99.9)]:
        np.testing.assert_array_equal(brain_mask(hu.astype(np.int16), hu_range, MaskSettings()),
                                      brain_mask(hu.astype(np.float32), hu_range, MaskSettings()))
