"""`python -m tfgan_ct.cli ...`, the same as `tfgan-ct ...`."""
from tfgan_ct.cli import main

main()
