"""Install tfgan-ct: Transfer-GAN x4 super-resolution for stroke-protocol brain CT."""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = {}
exec((HERE / "tfgan_ct" / "version.py").read_text(), VERSION)

# Compressed DICOM (JPEG Lossless, JPEG-LS, JPEG 2000) is common in hospital
# archives, so the decoders are part of the default install; the extra exists
# for people who install with --no-deps and add them later.
DICOM_CODECS = [
    "pylibjpeg>=2.0,<3",
    "pylibjpeg-libjpeg>=2.1,<3",
    "pylibjpeg-openjpeg>=2.3,<3",
]

setup(
    name="tfgan-ct",
    version=VERSION["__version__"],
    description="Transfer-GAN (ESRGAN) x4 super-resolution for stroke-protocol brain CT",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10,<3.14",
    # configs/*.yaml also install as package data (tfgan_ct.configs), so that
    # `tfgan-ct quickstart` finds its configuration outside a checkout too.
    packages=find_packages(include=["tfgan_ct", "tfgan_ct.*"]) + ["tfgan_ct.configs"],
    package_dir={"tfgan_ct.configs": "configs"},
    package_data={"tfgan_ct.configs": ["*.yaml"]},
    install_requires=[
        "tensorflow>=2.21,<2.22",
        "keras>=3.10,<4",
        "pydicom>=3.0,<4",
        "numpy>=1.26,<3",
        "scipy>=1.11,<2",
        "scikit-image>=0.22,<0.27",
        "pillow>=10,<14",
        "click>=8.1,<9",
        "absl-py>=2.0,<3",
        "PyYAML>=6.0,<7",
        "tqdm>=4.66,<5",
        "tensorboard>=2.20,<2.22",
        *DICOM_CODECS,
    ],
    extras_require={
        "dicom-codecs": DICOM_CODECS,
        # tensorflow-serving-api holds TF Serving's config and request protos, which the
        # tests use to check models.config and the warm-up requests. Each release pins
        # tensorflow>= its own version, so it follows the TensorFlow pin above.
        "test": ["pytest>=8,<10", "tensorflow-serving-api>=2.21,<2.22"],
    },
    entry_points={"console_scripts": ["tfgan-ct=tfgan_ct.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Medical Science Apps.",
        "Topic :: Scientific/Engineering :: Image Processing",
    ],
)
