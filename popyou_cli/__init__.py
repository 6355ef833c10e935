"""popyou: VAR text-to-image, specialised by synthetic data.

`from popyou_cli import Pipeline` is the inference API (popyou_cli/pipeline.py); it is imported on first use so
that `popyou --help` does not pay for torch.
"""
__version__ = "0.1.0"
__all__ = ["Pipeline", "__version__"]


def __getattr__(name: str):
    if name == "Pipeline":
        from .pipeline import Pipeline

        return Pipeline
    raise AttributeError(f"module 'popyou_cli' has no attribute {name!r}")
