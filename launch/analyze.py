"""Analyse a run: `python launch/analyze.py --log_dir logs/<experiment>` (also the
`celestial-analyze` console script). See diagnostics/analysis/cli.py."""
from diagnostics.analysis.cli import main

if __name__ == "__main__":
    main()
