"""Per-rank RNG states (torch, numpy, Python, CUDA) as tensor-only files, `rng_rank<r>.pt`
beside the shards (DCP would collapse per-rank values into one)."""
from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import torch

from trainer.checkpoint.manifest import read_inside
from trainer.checkpoint.safe_load import load_tensor_file
from trainer.errors import UserError

RNG_PREFIX = "rng_rank"
_RNG_FORMAT = 2          # 1 (unversioned): numpy's state pickled as an ndarray
_MAX_RNG_BYTES = 1 << 20        # an RNG state file holds about 10 KB
_OLD_RNG_GLOBALS = {"numpy.dtype", "numpy.ndarray", "numpy._core.multiarray._reconstruct",
                    "numpy.core.multiarray._reconstruct", "numpy.dtypes.UInt32DType"}


def rng_state() -> dict[str, torch.Tensor]:
    """This process's RNG states as tensors only, so the file loads with weights_only=True."""
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {"format": torch.tensor(_RNG_FORMAT), "torch": torch.get_rng_state(),
             "numpy_keys": torch.from_numpy(np_keys.astype(np.int64)),
             "numpy_pos_has_gauss": torch.tensor([np_pos, np_has_gauss], dtype=torch.int64),
             "numpy_gauss": torch.tensor(np_gauss, dtype=torch.float64),
             "python_version": torch.tensor(py_version),
             "python_internal": torch.tensor(py_internal, dtype=torch.int64),
             "python_gauss": torch.tensor([py_gauss is not None, py_gauss or 0.0],
                                          dtype=torch.float64)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    pos, has_gauss = state["numpy_pos_has_gauss"].tolist()
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), pos,
                         has_gauss, float(state["numpy_gauss"])))
    has_py_gauss, py_gauss = state["python_gauss"].tolist()
    random.setstate((int(state["python_version"]), tuple(state["python_internal"].tolist()),
                     py_gauss if has_py_gauss else None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


_RNG_SHAPES = {"torch": None, "numpy_keys": (624,), "numpy_pos_has_gauss": (2,),
               "numpy_gauss": (), "python_version": (), "python_internal": (625,),
               "python_gauss": (2,)}


def read_rng_file(path: Path) -> dict[str, torch.Tensor] | None:
    """A rank's RNG states, read only from a regular file inside its checkpoint folder. None
    for a file of the old format (numpy state pickled as an ndarray): it is not loaded at all,
    the rank seeds afresh. Anything else that is not a tensor-only RNG file is refused
    (UserError naming the file)."""
    data = read_inside(path.parent, path.name, _MAX_RNG_BYTES)
    if _is_old_rng_format(data):
        return None
    state = load_tensor_file(path, data)
    if not (isinstance(state, dict) and int(state.get("format", -1)) == _RNG_FORMAT
            and all(isinstance(state.get(k), torch.Tensor)
                    and (shape is None or tuple(state[k].shape) == shape)
                    for k, shape in _RNG_SHAPES.items())):
        raise UserError(f"{path}: not an RNG state file of this version")
    return state


def _is_old_rng_format(data: bytes) -> bool:
    try:
        names = set(torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(data)))
    except Exception:  # noqa: BLE001 - not a torch.save archive: load_tensor_file says so
        return False
    return bool(names) and names <= _OLD_RNG_GLOBALS
