"""Score a trained model against the naive baselines: `python launch/evaluate.py --checkpoint
checkpoints/<exp>/best_model.pth [--split test|val] [--out file.json]` (also the
`celestial-evaluate` console script). See forecasting/evaluate.py."""
from forecasting.evaluate import main

if __name__ == "__main__":
    main()
