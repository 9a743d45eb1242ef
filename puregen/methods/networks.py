"""The networks a method can ask for: how each is named on the command line and in messages.

`ebm` is the energy-based model (its energy and input gradient drive Langevin
dynamics); `unet` is the DDPM's noise-prediction UNet. The backend evaluates
both; a method lists the ones it needs in `Method.networks`, and only those
are loaded.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NetworkKind:
    kind: str  # the checkpoint kind (`load_model(..., expect=kind)`) and the backend's attribute
    flag: str  # the checkpoint option: --ebm, --ddpm (and the API keyword)
    what: str  # in messages


NETWORKS = {
    "ebm": NetworkKind("ebm", "ebm", "EBM"),
    "unet": NetworkKind("unet", "ddpm", "DDPM"),
}
