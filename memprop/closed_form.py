"""Closed-form memory of the seed's MLP (the seed's exercise 3): placeholder until derived."""

from __future__ import annotations

from typing import Any


def closed_form_for(workload: Any) -> dict[str, int] | None:
    return None
