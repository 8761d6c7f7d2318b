"""The SAN model and its parts."""

from san_fast.model.san import SAN

__all__ = ["SAN"]
