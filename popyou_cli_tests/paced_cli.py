"""`popyou ARGS` with pauses a test injects, for tests that SIGKILL a run at a chosen moment. Not part of popyou:
the CLI runs unchanged, with one of its functions wrapped in this process only.

    python paced_cli.py --batch-pause 0.5 -- encode --data ... --out ...
        sleeps 0.5 s after each batch a data stage (caption, encode) consumes, so that a run of tiny models,
        which would otherwise finish in a blink, is still running when the test's SIGKILL lands;
    python paced_cli.py --hold-wipe-after 10 --ready FILE -- gen-data ... --overwrite
        once --overwrite has deleted 10 entries of the folder it replaces, writes FILE and waits forever: the
        test kills the process in the middle of the wipe.
"""
import argparse
import sys
import time
from pathlib import Path


def _pace_batches(seconds: float) -> None:
    from popyou_cli.data.runner import DataStage

    real = DataStage.write_in_shards

    def write_in_shards(self, results, advance):
        def paced():
            for batch in results:
                yield batch
                time.sleep(seconds)

        return real(self, paced(), advance)

    DataStage.write_in_shards = write_in_shards


def _hold_wipe(after: int, ready: Path) -> None:
    from popyou_cli.store import folder

    real, removed = folder.remove, []

    def remove(path):
        real(path)
        path = Path(path)
        if path.name != folder.REPLACING and (path.parent / folder.REPLACING).exists():
            removed.append(path.name)
            if len(removed) == after:
                ready.write_text("\n".join(removed))
                while True:
                    time.sleep(60)

    folder.remove = remove


def main(argv: list[str]) -> None:
    split = argv.index("--")
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-pause", type=float, default=0.0)
    ap.add_argument("--hold-wipe-after", type=int, default=0)
    ap.add_argument("--ready", type=Path)
    opts = ap.parse_args(argv[:split])
    if opts.batch_pause:
        _pace_batches(opts.batch_pause)
    if opts.hold_wipe_after:
        _hold_wipe(opts.hold_wipe_after, opts.ready)
    from popyou_cli.cli.app import app

    sys.argv = ["popyou", *argv[split + 1:]]
    app()


if __name__ == "__main__":
    main(sys.argv[1:])
