"""Where training stands: steps and epochs taken, the data position, the best validation, the
skipped steps. One `TrainState` per run, a part of every sharded checkpoint: DCP's `Stateful`
protocol is its `state_dict` and `load_state_dict` (torch.distributed stays in the modules that
own it, trainer/checkpoint/)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from series.dataset import ResumableDistributedSampler


@dataclass
class TrainState:
    step: int = 0                   # optimizer steps taken (skipped ones included)
    epoch: int = 0
    epoch_position: int = 0         # samples of this epoch's permutation consumed (all ranks)
    total_steps: int = 0            # fixed at the first start: the LR schedule depends on it
    length_setting: str = ""        # "epochs=E max_steps=M" that total_steps was computed from
    best_val_nll: float = math.inf
    evals_without_improvement: int = 0
    skipped_steps: int = 0
    consecutive_skips: int = 0

    def start_epoch(self, sampler: ResumableDistributedSampler) -> None:
        """Point the training sampler at this epoch's permutation, past the samples already
        trained on (all of them after a resume in mid-epoch, whatever the number of ranks)."""
        sampler.start_epoch(self.epoch, self.epoch_position)

    def took_step(self, samples: int) -> None:
        """One optimizer step over `samples` samples (all ranks and micro-batches together)."""
        self.step += 1
        self.epoch_position += samples

    def finished_epoch(self) -> None:
        self.epoch += 1
        self.epoch_position = 0

    # Loaded in place: whoever holds this object sees the resumed state.
    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, sd: dict) -> None:
        for f in fields(self):
            setattr(self, f.name, sd[f.name])
