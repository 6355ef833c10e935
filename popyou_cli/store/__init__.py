"""Datasets on disk for every data stage (gen-data, caption, encode): sharded atomic writes, resume,
manifest, content hashes and lineage, zero-copy joined loading and column checks.

On-disk layout of a stage folder::

    OUT/
      popyou_stage.json               manifest: stage, parent (relative to OUT), settings, features, n_rows,
                                      shard_size, popyou version; after finalize the shards' content hashes
                                      (`shards`, `content`); for a later stage its parent's (`parent_content`)
      shard-00000-000000000-000001000.arrow   rows [0, 1000): shard id, first row, end row (exclusive)
      shard-00001-000001000-000002000.arrow   Arrow IPC *stream* files, the format `save_to_disk` writes
      .shard-00000-...arrow.sha256    the shard's hash and size, written as it was committed
      .shard-00002-...arrow.<pid>.<hex>.tmp   a shard being written: hidden and ignored until renamed
      .shard-00003-...arrow.damaged   a shard `popyou verify` found damaged: hidden, remade by a rerun
      .popyou.lock                    the writer's OS lock (locks.py): one writer at a time
      .popyou-replacing               only while --overwrite empties the folder: a rerun finishes the job
      dataset_info.json, state.json   written by `finalize()`: `datasets.load_from_disk(OUT)` memory-maps the
                                      shard files above in row order (no copy)

Shard k always holds rows [k*shard_size, (k+1)*shard_size) ∩ [0, n_rows), so shard ids mean the same rows
for every run, every process count and every n. A larger n on a finished folder adds only the missing rows
(a short last shard is extended: `ShardSpec.shard_start < start`); `finalize()` then rewrites state.json.
A stage folder holds `index` plus the stage's new columns; `load_stage` joins it side by side with its
parents' folders, so images are stored once, and refuses a parent whose content is no longer what the child
was made from (lineage.py). A rerun with other settings is refused unless overwrite; a rerun of the same
command makes what is missing, and remakes shards that fail the cheap checks (size, rows) or that `popyou
verify` set aside.

`layout.py`: the names, `ShardSpec`, and `read_manifest`, which checks a manifest against its schema before any
count in it is used. `folder.py`: `check_can_replace` (what --overwrite may delete: only a folder popyou made,
never a home folder or one holding an input) and `StageWriter` (`pending_shards`, `write_shard`, `finalize`;
data/runner.py runs it in several processes); every run first removes what a killed one left (temporary files,
sidecars of shards that never appeared) and finishes an interrupted --overwrite. `lineage.py`: shard hashes
and parent records. `loading.py`: `load_stage` (a folder joined with its parents), `require_columns` (names the
subcommand that makes a missing column), `materialize` (one standalone copy). `verify.py`: `popyou verify`. User errors raise `PopyouError` (one line).
Import everything from `popyou_cli.store`.
"""
from popyou_cli.store.folder import StageWriter, check_can_replace, check_not_same  # noqa: F401
from popyou_cli.store.layout import INDEX, INFO, MANIFEST, STATE, ShardSpec, read_manifest  # noqa: F401
from popyou_cli.store.loading import load_stage, materialize, producer_of, require_columns  # noqa: F401
from popyou_cli.store.verify import verify  # noqa: F401
