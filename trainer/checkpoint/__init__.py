"""Checkpoints: sharded ones with torch.distributed.checkpoint (DCP) to resume a run, and
single-file model files to forecast with. By concern: `manifest` (a checkpoint's files, sizes
and hashes), `safe_load` (reading untrusted files without running code), `rng` (per-rank RNG
states), `state` (the `Stateful` parts a checkpoint holds), `manager` (saving, finding and
loading, synchronously or not) and `model_file` (best and final model files)."""
