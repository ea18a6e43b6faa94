"""Train: `python launch/train.py --config configs/quickstart_cpu.yaml` on one device, or
`torchrun --nproc_per_node=N launch/train.py --config ...` on N. See trainer/cli.py.

The trainer knows only the observer protocol (trainer/observer.py); the plug-ins that provide
observers (the diagnostics package) register themselves (trainer/plugins.py)."""
from trainer.cli import main

if __name__ == "__main__":
    main()
