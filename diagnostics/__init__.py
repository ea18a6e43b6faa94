"""Observers of the training step (gradients, attention, profiling) and the offline analysis."""
