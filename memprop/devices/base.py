"""The one interface every memory backend answers."""

from __future__ import annotations

from typing import Any, Protocol

__all__ = ["MemoryDevice"]


class MemoryDevice(Protocol):
    """A device whose memory memprop can measure around a step."""

    name: str
    """``cpu`` or ``cuda:N``."""

    def reset_peak(self) -> None:
        """Start a new high-water mark at the current use."""

    def current_bytes(self) -> int:
        """Bytes in use now, as this backend counts them."""

    def peak_bytes(self) -> int:
        """The high-water mark since the last ``reset_peak``."""

    def available_bytes(self) -> int:
        """Bytes a new allocation could still take on this device."""

    def describe(self) -> dict[str, Any]:
        """What the reports say about the device: name, total memory, driver..."""
