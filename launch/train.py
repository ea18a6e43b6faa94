"""Train: `python launch/train.py --config configs/quickstart_cpu.yaml` on one device, or
`torchrun --nproc_per_node=N launch/train.py --config ...` on N. See trainer/cli.py.

The entry point wires the trainer and its plug-ins together: the trainer knows only the
observer protocol (trainer/observer.py), the diagnostics package provides the observers."""
from diagnostics.observers import build_observers
from trainer.cli import main

if __name__ == "__main__":
    main(observers=build_observers)
