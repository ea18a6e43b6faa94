"""What a sharded checkpoint holds: the `Stateful` parts saved under the one key `app`."""
from __future__ import annotations

import torch
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful


class AppState(Stateful):
    """A sharded checkpoint's content: named Stateful parts, saved under the one key `app`, plus
    the config as text (read back from config.yaml, never from here). Per-rank RNG states go in
    files beside it. The names are the checkpoint layout: changing one breaks resuming."""

    def __init__(self, parts: dict[str, Stateful], config_yaml: str) -> None:
        self.parts, self.config_yaml = parts, config_yaml

    def state_dict(self) -> dict:
        return {**{name: part.state_dict() for name, part in self.parts.items()},
                "config": self.config_yaml}

    def load_state_dict(self, sd: dict) -> None:
        for name, part in self.parts.items():    # in order: the model before its optimizer
            part.load_state_dict(sd[name])


class ModelState(Stateful):
    """The model's weights, by parameter name whatever wraps it (DDP, torch.compile)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict:
        return get_model_state_dict(self.model)

    def load_state_dict(self, sd: dict) -> None:
        set_model_state_dict(self.model, sd)


class OptimizerState(Stateful):
    """The optimizer's moments and groups, by parameter name (so any world size loads them)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict:
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, sd: dict) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, sd)


class ScalerState(Stateful):
    """The fp16 loss scaler; a placeholder when it is off (the layout keeps the key)."""

    def __init__(self, scaler: torch.amp.GradScaler) -> None:
        self.scaler = scaler

    def state_dict(self) -> dict:
        return self.scaler.state_dict() if self.scaler.is_enabled() else {"off": 1}

    def load_state_dict(self, sd: dict) -> None:
        if self.scaler.is_enabled():
            self.scaler.load_state_dict(sd)


def checkpointed_state(step, train_state: Stateful, config) -> AppState:
    """The Stateful parts a sharded checkpoint holds for a training step (a TrainStep) and
    its TrainState, under the key names it always had (the train state's is `progress`)."""
    return AppState({"model": ModelState(step.train_model),
                     "optimizer": OptimizerState(step.train_model, step.optimizer),
                     "scheduler": step.scheduler, "scaler": ScalerState(step.scaler),
                     "progress": train_state}, config_yaml=config.to_yaml())
