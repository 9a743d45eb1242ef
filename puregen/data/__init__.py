"""Image data I/O and the uint8 <-> model-space contract.

On disk and at API edges images are ``uint8`` NHWC (C = 1 or 3) and labels
integers; the Python API also takes float images in [0, 1].  Inside the
engine images are ``float32`` NCHW in [-1, 1].  See :mod:`puregen.data.convert`.
"""

from puregen.data.convert import from_model_space, prepare_api_input, to_model_space
from puregen.data.dataset import ImageDataset
from puregen.data.readers import read_dataset
from puregen.data.writers import write_dataset

__all__ = [
    "ImageDataset",
    "read_dataset",
    "write_dataset",
    "to_model_space",
    "from_model_space",
    "prepare_api_input",
]
