"""tfgan-ct: Transfer-GAN x4 super-resolution for stroke-protocol brain CT."""
from tfgan_ct.version import __version__

__all__ = ["__version__"]
