"""hpsearch: hyperparameter search for fine-tuning torchvision image classifiers, on Optuna.

The package's top level stays light: `import hpsearch.train` must not pull in Optuna, so public names
that need it are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["__version__", "load_ensemble", "open_storage", "read_study_file"]

if TYPE_CHECKING:
    from hpsearch.config import read_study_file
    from hpsearch.predict import load_ensemble
    from hpsearch.store import open_storage


def __getattr__(name: str) -> Any:
    if name == "open_storage":
        from hpsearch.store import open_storage

        return open_storage
    if name == "load_ensemble":
        from hpsearch.predict import load_ensemble

        return load_ensemble
    if name == "read_study_file":
        from hpsearch.config import read_study_file

        return read_study_file
    raise AttributeError(f"module 'hpsearch' has no attribute {name!r}")
