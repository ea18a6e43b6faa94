"""Single-file models: `best_model.pth` / `final_model.pth` hold the weights, config and data
spec in one `torch.save` file that loads weights-only."""
from __future__ import annotations

from pathlib import Path

import torch

from trainer.checkpoint.safe_load import load_tensor_file
from trainer.errors import UserError


def save_consolidated(path: Path, model: torch.nn.Module, extra: dict) -> None:
    """Rank 0 writes a single-file model (plain torch.load, no process group needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    torch.save({"model": state, **extra}, tmp)
    tmp.replace(path)


def load_consolidated(path: Path) -> dict:
    """A best/final model file, loaded without unpickling anything but tensors and plain data;
    a crafted file is refused with a one-line UserError naming it."""
    content = load_tensor_file(path)
    if not (isinstance(content, dict) and isinstance(content.get("model"), dict)):
        raise UserError(f"{path}: not a model file of this project (no 'model' weights)")
    return content
