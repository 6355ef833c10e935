"""popyou: VAR text-to-image, specialised by synthetic data."""
__version__ = "0.1.0"
