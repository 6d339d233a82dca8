"""Importers that turn public datasets into the appliance's dataset folder format."""

from appliance.datasets.elpv import import_elpv

__all__ = ["import_elpv"]
