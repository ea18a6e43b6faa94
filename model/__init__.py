"""The Celestial Enhanced PGAT network (no I/O, no logging, no knowledge of DDP)."""
from model.config import InputSpec, ModelConfig
from model.pgat import COMPONENT_NAMES, CelestialPGAT, ForecastOutput

__all__ = ["COMPONENT_NAMES", "CelestialPGAT", "ForecastOutput", "InputSpec", "ModelConfig"]
