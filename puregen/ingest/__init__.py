"""Purification where the data already flows: a torch `Dataset` wrapper and Hugging Face `datasets` maps.

Both purify in batches through `Purifier.purify_batch` with the noise keyed by each sample's
index, so their bytes equal `Purifier.purify` and the bulk pipeline on the same rows, seed and
thread count. Neither sees the whole dataset: a method that needs it (a prepass such as `filt`'s
energy quantile, or a fit) runs here only with its dataset state given.
"""

from .hf_datasets import hf_purify_function, purify_hf_dataset
from .torch_dataset import PurifiedDataset

__all__ = ["PurifiedDataset", "hf_purify_function", "purify_hf_dataset"]
