"""How a family's routes (``services/<family>/routes.py``) reach that family's route logic.

The routes are declared on an ``APIRouter`` per family, which the entry service mounts whether
or not it serves the family, so that every deployment documents and answers the same URLs. The
route logic (``ClipAPI``, ...) lives in the entry service's instance, built for the families it
serves; a route asks for it when a request comes, and a family not served answers 404.
"""

from __future__ import annotations

from typing import Any

import bentoml

from configuration.families import Family


def served_family(family: Family) -> Any:
    """The route logic of ``family`` in this worker's entry service; 404 ``not_served`` when the
    deployment does not serve it (``MULTIMODAL_FAMILIES``)."""
    return bentoml.get_current_service().family(family)
