from .io import atomic_directory, atomic_save

__all__ = ["atomic_directory", "atomic_save"]
