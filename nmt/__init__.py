"""nmt: neural machine translation with one pipeline for a Transformer and a GNMT."""

__version__ = "0.1.0"
