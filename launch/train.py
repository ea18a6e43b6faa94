"""Train: `python launch/train.py --config configs/quickstart_cpu.yaml` on one device, or
`torchrun --nproc_per_node=N launch/train.py --config ...` on N. See trainer/cli.py."""
from trainer.cli import main

if __name__ == "__main__":
    main()
