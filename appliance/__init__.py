"""Edge appliance for visual defect classification."""

__version__ = "0.1.0"
