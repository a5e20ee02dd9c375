"""Small shared utilities: atomic file writes, checkpoints, seeding, devices, logging."""
from .io import atomic_save_npy, atomic_write_text, atomic_write_json, save_checkpoint, load_checkpoint, atomic_path
from .runtime import seed_everything, pick_device, get_logger, set_threads

__all__ = [
    "atomic_save_npy", "atomic_write_text", "atomic_write_json", "save_checkpoint", "load_checkpoint",
    "atomic_path", "seed_everything", "pick_device", "get_logger", "set_threads",
]
