"""puregen: fast purification of poisoned image training data.

>>> import puregen
>>> p = puregen.load_purifier("ebm", ebm="checkpoints/ebm", device="cpu")
>>> clean = p.purify(images_uint8_nhwc, seed=0)
"""

__version__ = "0.1.0"

from .errors import CheckpointError, InputError, PuregenError  # noqa: E402

_API = ("load_purifier", "purify", "purify_dataset")
_INGEST = ("PurifiedDataset", "purify_hf_dataset", "hf_purify_function")
__all__ = [*_API, *_INGEST, "InputError", "CheckpointError", "PuregenError", "__version__"]


def __getattr__(name):
    # The API pulls in torch and the engine: import it on first use, so that
    # `import puregen.kernels.philox` or `puregen --help` stay light.
    if name in _API:
        from . import api

        return getattr(api, name)
    if name in _INGEST:
        from . import ingest

        return getattr(ingest, name)
    raise AttributeError(f"module 'puregen' has no attribute {name!r}")
