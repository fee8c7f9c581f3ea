"""Data sets, train/validation/test splits and vertical views of the features."""

from liquid_fed.data.dataset import TASKS, Dataset, IdIndex
from liquid_fed.data.datasets import DATASETS, load_dataset
from liquid_fed.data.probe import view_summary
from liquid_fed.data.splits import (
    Splits,
    Standardizer,
    align_ids,
    common_ids,
    split_ids,
    standardize,
)
from liquid_fed.data.views import PARTITIONERS, ViewPlan, make_views

__all__ = [
    "DATASETS",
    "PARTITIONERS",
    "Dataset",
    "IdIndex",
    "Splits",
    "Standardizer",
    "TASKS",
    "ViewPlan",
    "align_ids",
    "common_ids",
    "load_dataset",
    "make_views",
    "split_ids",
    "standardize",
    "view_summary",
]
