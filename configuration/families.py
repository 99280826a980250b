"""The model families this product serves, declared once: the settings, the profiles, the entry
service, the metrics, the model import and the deployment generator read them from here."""

from __future__ import annotations

from typing import Literal, get_args

Family = Literal["clip", "llava", "whisper"]
FAMILIES: tuple[Family, ...] = get_args(Family)
# How people write each family's name (dashboards, alerts).
TITLES: dict[Family, str] = {"clip": "CLIP", "llava": "LLaVA", "whisper": "Whisper"}
