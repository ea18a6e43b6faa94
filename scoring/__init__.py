"""How forecasts are scored, shared by validation in training and the evaluate command: proper
scores, the naive baselines, skill, calibration (torch, numpy and the model's mixture only)."""
