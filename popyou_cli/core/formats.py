"""The names of the records that mark popyou's folders (docs/formats.md), written once for the layers that write
them and the layers that read them."""
from __future__ import annotations

PIPELINE_JSON = "pipeline.json"  # a pipeline folder's parts and sampling defaults (infer/folder.py)
SAMPLES_JSONL = "samples.jsonl"  # `popyou sample`'s record of its images, one line each
METRICS_JSON = "metrics.json"  # `popyou eval`'s numbers (eval/report.py)
OUTPUT_RECORDS = (SAMPLES_JSONL, METRICS_JSON)  # a folder holding one was written by popyou sample or eval
