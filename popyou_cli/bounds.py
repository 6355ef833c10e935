"""The accepted range of every count, seed and number a user types, checked before any work starts.

Each check raises a one-line PopyouError that names the option and its range. The limits are what the code can
honour, not taste:
* seeds: 0 <= seed < 2^63, what torch.Generator.manual_seed and the int64 `seed` column hold without wrapping;
* rows of a data set: at most 10^9. A shard file's name carries its rows in 9 digits, and 10^9 images at
  512 px are about 400 TB: a larger --n is a typo, and one refused at once costs less than one that runs;
* shards of a folder: at most 10^6 files (state.json lists them all, and every rerun scans them);
* batch sizes: at most 65536 rows, far beyond what fits in any accelerator at once.
"""
from __future__ import annotations

import math

from .errors import PopyouError

MAX_SEED = 2**63
MAX_ROWS = 10**9
MAX_SHARDS = 10**6
MAX_BATCH = 65536


def check_int(flag: str, value: int | None, low: int, high: int) -> None:
    """low <= value <= high (None: not given, nothing to check)."""
    if value is not None and not low <= value <= high:
        raise PopyouError(f"{flag} must be in {low}..{high:_} (got {value:_})")


def check_seed(flag: str, seed: int | None) -> None:
    if seed is not None and not 0 <= seed < MAX_SEED:
        raise PopyouError(f"{flag} must be in [0, 2^63) (got {seed})")


def check_finite(**values: float | None) -> None:
    """Every given number finite (NaN and infinities are refused); keys are option names, e.g. lr=..."""
    for name, v in values.items():
        if v is not None and not math.isfinite(v):
            raise PopyouError(f"--{name.replace('_', '-')} must be a finite number (got {v})")


def check_rows(n: int, shard_size: int) -> None:
    """--n and --shard-size of a data stage: 1..MAX_ROWS rows in at most MAX_SHARDS shards."""
    check_int("--n", n, 1, MAX_ROWS)
    check_int("--shard-size", shard_size, 1, MAX_ROWS)
    shards = -(-n // shard_size)
    if shards > MAX_SHARDS:
        raise PopyouError(f"--n {n} in shards of {shard_size} rows makes {shards} shard files, more than "
                          f"{MAX_SHARDS}; raise --shard-size to at least {-(-n // MAX_SHARDS)}")
