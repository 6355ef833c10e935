"""The life of a data stage (gen-data, caption, encode): sharded, resumable, several processes, in one place.

A stage builds a `DataStage` in every process of a launch, then:

    run = DataStage("caption", device, dtype)        # accelerate's state, this process's device and dtype
    specs = run.open(out, parent=..., settings=..., features=..., n_rows=..., shard_size=..., overwrite=...)
    if specs:                                         # a finished folder does not even load the models
        with run.running(progress, console) as advance:
            run.write_in_shards(results_per_batch, advance)
    res = run.finish("caption_error")                 # finalize on the main process, count errors, release all

`open` builds store.StageWriter with the multi-process protocol (the main process creates or checks the
folder, then the others read its manifest) and returns this process's unfinished shards (shard k goes to
rank k % world_size). Input folders are checked by `open_input`, rows are read by `loader` in DataLoader
workers in batches that never straddle two shards (`shard_batches`), and `write_in_shards` writes each shard
the moment its last row is in. Image files named by a path column are read by `read_cell` (for `open_image`),
which refuses what is not a regular file (a named pipe would block a worker forever) and says why a file cannot
be read.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from popyou_cli.core.devices import dtype_name, resolve_device, resolve_dtype
from popyou_cli.core.errors import PopyouError

MAX_IMAGE_FILE = 1 << 30  # bytes; a larger "image" in a data set is a mistake, refused per row


def check_at_least_1(*flags: tuple[str, int]) -> None:
    """Refuse the first (flag, value) whose value is under 1, with the flag's name in the message."""
    for flag, value in flags:
        if value < 1:
            raise PopyouError(f"{flag} must be at least 1 (got {value})")


def check_workers(workers: int) -> None:
    if workers < 0:
        raise PopyouError(f"--workers must be >= 0 (got {workers})")


# ------------------------------------------------------------------------------------------ processes
def stage_state(device: str):
    """accelerate's view of this launch (rank, world size, device). PartialState only joins a CPU process group
    when told it runs on CPU (AcceleratorState reads ACCELERATE_USE_CPU, PartialState does not): without cpu=True,
    torchrun on a machine without GPUs gives every process world size 1 and each would redo every shard."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    cpu = device == "cpu" or parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    return PartialState(cpu=cpu)


def stage_device(device: str, state) -> torch.device:
    """--device for one process of a launch: auto (and plain cuda under several processes) means accelerate's
    per-process device, cuda:LOCAL_RANK or cpu, so that 8 processes do not all pile onto cuda:0."""
    if device == "auto" or (device == "cuda" and state.num_processes > 1):
        return torch.device(state.device)
    return resolve_device(device)


def open_stage_writer(state, out, **kw):
    """store.StageWriter built with the multi-process protocol: the main process creates or checks the folder
    first, then the others only read its manifest. A refusal on the main process is sent to every process (the
    others would otherwise wait forever at the barrier) and raised everywhere as the same PopyouError."""
    from popyou_cli.core.processes import on_main_process
    from popyou_cli.store import StageWriter

    writer = on_main_process(state, lambda: StageWriter(out, main_process=True, **kw))
    if writer is None:
        kw.pop("overwrite", None)  # only the main process may wipe
        writer = StageWriter(out, main_process=False, **kw)
    return writer


@contextlib.contextmanager
def progress_bar(enabled: bool, console, total: int, label: str):
    """Yields advance(k): a live bar on a terminal, else a log line every --progress-every seconds (progress.py)."""
    from popyou_cli.core.progress import Progress

    with Progress(label, total, console=console, unit="images", enabled=enabled) as progress:
        yield progress.advance


# ------------------------------------------------------------------------------------------ input rows
def default_workers() -> int:
    return max(0, min(4, os.cpu_count() or 1))


def undecoded(ds, column: str):
    """`ds` whose `column` yields raw cells (bytes / path dicts) instead of PIL images, so that decoding happens
    in images.open_rgb, in the workers, with its error handling. Accepts Image(), binary and path-string columns."""
    import datasets

    feature = ds.features.get(column)
    if isinstance(feature, datasets.Image):
        return ds.cast_column(column, datasets.Image(decode=False))  # only flips a flag: no data is rewritten
    if isinstance(feature, datasets.Value) and feature.dtype in ("binary", "large_binary", "string", "large_string"):
        return ds
    raise PopyouError(f"column '{column}' is not an image column (it holds {feature}); "
                      "choose one with --image-column")


def open_input(dataset, out, *, stage: str, image_column: str, columns: Sequence[str] = ()):
    """The input of an image stage: the dataset joined with its parents (store.load_stage), checked before any
    model loads: --out must not overlap it, the needed columns must exist (else a one-line error naming the
    subcommand that makes them), and its rows must be 0..n-1 in order, since the output joins it row by row."""
    from popyou_cli.store import check_not_same, load_stage, require_columns

    check_not_same(dataset, out)
    ds = load_stage(dataset)
    require_columns(ds, [image_column, *columns], for_stage=stage, path=dataset)
    index = ds.data.column("index").to_numpy()
    if not np.array_equal(index, np.arange(len(ds))):
        raise PopyouError(f"{dataset}: its 'index' column is not 0..{len(ds) - 1} in order; "
                          "popyou stages join row by row, so give them a whole stage folder, not a subset")
    undecoded(ds, image_column)  # fails early on a column that holds no images
    if getattr(ds.features[image_column], "dtype", None) in ("string", "large_string"):
        # A path column, or a text column chosen by mistake: one error now beats an error on every row.
        head = ds.select_columns([image_column]).select(range(min(len(ds), 100)))[image_column]
        first = next((v for v in head if v), None)
        if first is not None and not os.path.isfile(os.path.expanduser(first)):
            raise PopyouError(f"column '{image_column}' holds text, not image files (e.g. '{first[:60]}'); "
                              "choose the image column with --image-column")
    return ds


class RowLoader:
    """A map-style torch dataset over rows of a datasets.Dataset. DataLoader hands it a whole batch of row
    numbers (`__getitems__`), which costs one Arrow read per batch, not one per row; `prepare(row, cells)` runs
    in the worker on each row's cells (a dict column -> value) and returns what the stage's collate takes."""

    def __init__(self, ds, prepare: Callable[[int, dict], Any]):
        self.ds, self.prepare = ds, prepare

    def __len__(self) -> int:
        return len(self.ds)

    def __getitems__(self, rows: Sequence[int]) -> list:
        batch = self.ds[list(rows)]
        return [self.prepare(r, {c: batch[c][k] for c in batch}) for k, r in enumerate(rows)]

    def __getitem__(self, row: int):
        return self.__getitems__([row])[0]


class shard_batches:  # noqa: N801 - used like the function it replaced
    """Row batches in shard order that never straddle two shards: a shard is written as soon as its last batch
    is done, so a kill loses at most the shard in flight. Made on the fly (DataLoader's batch_sampler only
    iterates), so memory does not grow with the number of rows."""

    def __init__(self, specs, batch_size: int):
        self.specs, self.batch_size = specs, batch_size

    def __iter__(self):
        for s in self.specs:
            for b in range(s.start, s.stop, self.batch_size):
                yield list(range(b, min(b + self.batch_size, s.stop)))

    def __len__(self) -> int:
        return sum(-(-len(s.rows) // self.batch_size) for s in self.specs)


class DieWithParent:
    """worker_init_fn of the stages' DataLoaders: on Linux the kernel SIGKILLs a worker as soon as the process
    that forked it dies (prctl PR_SET_PDEATHSIG). After a `kill -9` of a stage, an orphaned worker would
    otherwise finish its batch, print a ConnectionResetError traceback onto the user's terminal seconds later,
    and only then exit. (The folder's lock is not at stake: locks.py closes a forked child's copy at the fork.)
    The signal follows the thread that forked the worker: `loader` is iterated on the main thread."""

    def __init__(self):
        self.parent = os.getpid()

    def __call__(self, worker_id: int) -> None:
        import sys

        if not sys.platform.startswith("linux"):
            return
        import ctypes
        import signal

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1: PR_SET_PDEATHSIG
        if os.getppid() != self.parent:  # the parent died before the line above ran
            os._exit(0)


def loader(ds, prepare, collate, batches, workers: int, pin_memory: bool = False):
    """A DataLoader yielding collate(list of prepared rows) for each batch, in order: the workers decode and
    preprocess (the slow, CPU-bound part), the main process only runs the models and writes shards."""
    from torch.utils.data import DataLoader

    # Workers are forked after the tokenizers' Rust thread pool may have run; they are the parallelism here.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return DataLoader(RowLoader(ds, prepare), batch_sampler=batches, collate_fn=collate, num_workers=workers,
                      pin_memory=pin_memory, prefetch_factor=4 if workers else None,
                      worker_init_fn=DieWithParent() if workers else None)


def read_cell(cell) -> tuple[Any, str]:
    """An image cell with the file a path cell names read here: (the cell, or the file's bytes, and "") or (None,
    the reason). Only a regular file of at most MAX_IMAGE_FILE bytes is read (a named pipe or a device would block
    or never end), and an unreadable one is said so (permission denied, no such file)."""
    from popyou_cli.core.files import read_regular

    path = cell if isinstance(cell, str) else cell.get("path") if isinstance(cell, dict) and \
        cell.get("bytes") is None else None
    if path:
        try:
            return read_regular(os.path.expanduser(path), "image file", MAX_IMAGE_FILE), ""
        except PopyouError as e:
            return None, str(e)
    return cell, ""


def open_image(cell) -> tuple[Any, str]:
    """images.open_rgb of one image cell, a file named by a path cell read first (read_cell): (RGB image or None,
    reason)."""
    from popyou_cli.core.images import open_rgb

    cell, error = read_cell(cell)
    return (None, error) if error else open_rgb(cell)


# ------------------------------------------------------------------------------------------ output folder
def count_errors(out, column: str) -> tuple[int, str]:
    """(rows of the finished folder `out` whose `column` is not empty, the first such message with its row)."""
    import datasets
    import pyarrow.compute as pc

    table = datasets.load_from_disk(str(out)).data
    col = table.column(column)
    bad = pc.not_equal(pc.fill_null(col, ""), "")
    n = pc.sum(bad).as_py() or 0
    if not n:
        return 0, ""
    first = pc.index(bad, True).as_py()
    return n, f"row {table.column('index')[first].as_py()}: {col[first].as_py()}"


@dataclass
class DataStageResult:
    """What a data stage did, as every process returns it (the main process prints it)."""
    stage: str
    out: str
    n: int  # rows the folder holds now
    done: int  # rows made by this run, all processes
    process_done: int  # rows made by this process
    seconds: float  # this process's time making them
    errors: int  # rows of the whole folder with an error (also from earlier, interrupted runs)
    first_error: str
    world_size: int
    is_main_process: bool
    device: str
    dtype: str  # fp32 / fp16 / bf16
    what: str = "made"  # the verb of the summary line ("captioned")
    details: str = ""  # the models used, for the summary line

    @property
    def images_per_s(self) -> float | None:
        return self.process_done / self.seconds if self.seconds else None

    def errors_note(self) -> str:
        """The summary line's end: "; no errors", or how many rows have one and the first."""
        if not self.errors:
            return "; no errors"
        return f"; {self.errors} of {self.n} rows have an error in {self.stage}_error (first: {self.first_error})"

    def work_note(self) -> str:
        """This process's share of the summary line: "N in S s[ on this process][, R images/s]"."""
        rate = f", {self.images_per_s:.1f} images/s" if self.images_per_s else ""
        per = " on this process" if self.world_size > 1 else ""
        return f"{self.process_done} in {self.seconds:.1f} s{per}{rate}"

    def summary(self) -> str:
        """The line the CLI prints at the end (main process)."""
        if not self.done:
            return f"{self.stage}: {self.out} already holds all {self.n} rows; nothing to do{self.errors_note()}"
        return (f"{self.stage}: {self.out} holds {self.n} rows; {self.what} {self.done} now ({self.work_note()}) with "
                f"{self.details} on {self.world_size} process(es), {self.device}, {self.dtype}{self.errors_note()}")

    def __str__(self) -> str:
        return self.summary()


class DataStage:
    """One run of a data stage in this process; see the module docstring."""

    def __init__(self, name: str, device: str = "auto", dtype: str | torch.dtype | None = None):
        self.name = name
        self.state = stage_state(device)
        self.device = stage_device(device, self.state)
        self.dtype = resolve_dtype(dtype, self.device, "data")
        self.writer, self.out, self.specs, self.seconds = None, None, [], 0.0

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype)

    @property
    def is_main_process(self) -> bool:
        return self.state.is_main_process

    @property
    def todo(self) -> int:
        """Rows this process makes now."""
        return sum(len(s.rows) for s in self.specs)

    def open(self, out, **writer_options) -> list:
        """Create or check the output folder (store.StageWriter options but `stage`); this process's shards."""
        self.out = Path(out)
        self.writer = open_stage_writer(self.state, self.out, stage=self.name, **writer_options)
        self.specs = self.writer.pending_shards(self.state.process_index, self.state.num_processes)
        return self.specs

    @contextlib.contextmanager
    def running(self, progress: bool, console):
        """Times the body; yields advance(k) of the progress bar (shown on the main process only)."""
        t0 = time.perf_counter()
        with progress_bar(progress and self.is_main_process, console, self.todo, self.name) as advance:
            yield advance
        self.seconds = time.perf_counter() - t0

    def write_in_shards(self, results, advance) -> None:
        """Consume `results`, an iterator of (rows, {column: values}) per batch in the order of
        shard_batches(specs), and write each shard the moment its last row is in. A shard's results are in
        memory only until then, so memory is one shard's results, whatever the data set size."""
        specs = iter(self.specs)
        spec, columns = next(specs, None), {}
        for rows, values in results:
            if spec is None or rows[0] < spec.start or rows[-1] >= spec.stop:
                raise RuntimeError(f"batch of rows {rows[0]}..{rows[-1]} outside the shard being written")
            for name, vals in values.items():
                columns.setdefault(name, []).extend(vals)
            advance(len(rows))
            if rows[-1] == spec.stop - 1:
                self.writer.write_shard(spec, columns)
                spec, columns = next(specs, None), {}

    def finish(self, error_column: str | None, result: type[DataStageResult] = DataStageResult,
               **details) -> DataStageResult:
        """The end in every process: wait for all, finalize on the main process, count the rows with errors in
        the whole folder, release everyone together. error_column None (gen-data has none): errors 0.
        Returns `result` (DataStageResult or a stage's subclass) with `details`, its extra fields."""
        state, todo = self.state, self.todo
        done = todo
        if state.num_processes > 1:
            from accelerate.utils import gather_object

            done = sum(gather_object([todo]))  # also a barrier: every shard is written after it
        errors, first = 0, ""
        if state.is_main_process:
            if done or not self.writer.is_complete():  # a remade shard of a finished folder: new hashes
                self.writer.finalize()
            if error_column is not None:
                errors, first = count_errors(self.out, error_column)
        state.wait_for_everyone()  # nobody returns (and reads the folder) before finalize
        self.writer.release()
        return result(stage=self.name, out=str(self.out), n=self.writer.n_rows, done=done, process_done=todo,
                      seconds=self.seconds, errors=errors, first_error=first, world_size=state.num_processes,
                      is_main_process=state.is_main_process, device=str(self.device), dtype=self.dtype_name,
                      **details)
