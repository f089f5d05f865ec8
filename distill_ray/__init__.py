"""distill-ray: distil several frozen teachers into one small student on Ray."""

__version__ = "0.2.0"
