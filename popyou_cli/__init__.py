"""popyou: VAR text-to-image, specialised by synthetic data.

`from popyou_cli import Pipeline` is the inference API (popyou_cli/infer/pipeline.py); it is imported on first use so
that `popyou --help` does not pay for torch.
"""
from popyou_cli.core.version import __version__
__all__ = ["Pipeline", "__version__"]


def __getattr__(name: str):
    if name == "Pipeline":
        from popyou_cli.infer.pipeline import Pipeline

        return Pipeline
    raise AttributeError(f"module 'popyou_cli' has no attribute {name!r}")
