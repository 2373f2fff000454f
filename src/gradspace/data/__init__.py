"""Prepared datasets: sources, the ``prepare`` stage and the batch loader.

See docs/architecture.md, section "Prepared datasets".
"""

from . import filesources  # noqa: F401 - registers imagefolder, cifar10/100, svhn
from .loader import check_prepared, iter_batches, num_samples, read_info
from .prepare import prepare_dataset
from .sources import SOURCES, get_source, register_source

__all__ = ["SOURCES", "check_prepared", "get_source", "iter_batches", "num_samples",
           "prepare_dataset", "read_info", "register_source"]
