"""Scoring methods against each other: PSNR/SSIM, Table 1, paired t-tests, Fig. 2 figures."""
