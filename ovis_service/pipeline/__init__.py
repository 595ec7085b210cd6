"""Everything that imports torch or diffusers lives in this package."""

from ovis_service.pipeline.diffusers_engine import DiffusersEngine

__all__ = ["DiffusersEngine"]
