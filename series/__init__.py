"""Time series for training and forecasting: the built-in dataset, CSV files, market data,
splits, scaling, windows and the resumable sampler."""
