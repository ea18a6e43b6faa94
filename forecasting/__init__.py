"""Forecasting with a trained model file: reading it, preparing its inputs, forecasting,
evaluating on the test windows, and the fan chart."""
