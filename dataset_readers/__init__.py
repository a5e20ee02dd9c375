"""Dataset readers: every reader returns sorted samples in one fixed order, the order of every score file."""
from .base import (GOOD, LOGICAL, STRUCTURAL, CategoryData, DatasetError, Sample, image_size, list_images, load_image,
                   load_mask, load_sample_masks, union_mask)
from .registry import DATASETS, SYNTHETIC_CATEGORIES, dataset_root, list_categories, read_category

__all__ = ["GOOD", "LOGICAL", "STRUCTURAL", "CategoryData", "DatasetError", "Sample", "image_size", "list_images",
           "load_image", "load_mask", "load_sample_masks", "union_mask", "DATASETS", "SYNTHETIC_CATEGORIES",
           "dataset_root", "list_categories", "read_category"]
