"""r3v: self-improving vision-language reasoning by reflection (R3V)."""

__version__ = "0.1.0"
