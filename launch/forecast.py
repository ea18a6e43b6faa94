"""Forecast with a trained model: `python launch/forecast.py --checkpoint
checkpoints/<exp>/best_model.pth --data my.csv --out forecasts/` (also the `celestial-forecast`
console script). See forecasting/forecast.py."""
from forecasting.forecast import main

if __name__ == "__main__":
    main()
