"""`python launch/experiment.py experiment.yaml` (also `celestial-experiment`): see
experiments/cli.py."""
from experiments.cli import main

if __name__ == "__main__":
    main()
