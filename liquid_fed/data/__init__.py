"""Data sets, train/validation/test splits and vertical views of the features."""

from liquid_fed.data.datasets import DATASETS, Dataset, load_dataset
from liquid_fed.data.splits import (
    Splits,
    Standardizer,
    align_ids,
    common_ids,
    split_ids,
    standardize,
)
from liquid_fed.data.views import PARTITIONERS, ViewPlan, make_views, view_summary

__all__ = [
    "DATASETS",
    "PARTITIONERS",
    "Dataset",
    "Splits",
    "Standardizer",
    "ViewPlan",
    "align_ids",
    "common_ids",
    "load_dataset",
    "make_views",
    "split_ids",
    "standardize",
    "view_summary",
]
