"""popyou's version: one place, read by the package, the manifests it writes and `popyou --version`."""
__version__ = "0.1.0"
