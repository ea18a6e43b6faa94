"""Statistics shared by the evaluation, the verdict and the experiments: intervals for mean score
differences over overlapping forecast windows (numpy and scipy only)."""
