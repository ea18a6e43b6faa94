"""Forecast with a trained model: `python launch/forecast.py --checkpoint
checkpoints/<exp>/best_model.pth --data my.csv --out forecasts/` (also the `celestial-forecast`
console script). See trainer/forecast.py."""
from trainer.forecast import main

if __name__ == "__main__":
    main()
