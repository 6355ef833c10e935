"""A folder of pictures as rows: its image files (recursive), their texts from metadata files, and a fingerprint
that changes when the folder does.

The convention is the `imagefolder` one of Hugging Face datasets (and of diffusers' and LitGPT's fine-tuning
scripts): image files anywhere under the folder, chosen by extension (`IMAGE_EXTENSIONS`, datasets' own list),
and optionally `metadata.jsonl`, `metadata.csv` or `metadata.parquet` files, each with a `file_name` column
(relative to the metadata file's folder) and a text column, `prompt`, `caption` or `text` (the first of these
present is used). Hidden files and folders are skipped, as datasets skips them; links to folders are not followed.

Every image file is a row, in the sorted order of its path, and so is a file a metadata file names that is not
there (its row says so): a bad file is never dropped silently. `fingerprint` hashes the relative path, kind, size
and modification time of every file that counts (the images and the metadata files): adding, removing, renaming,
or rewriting any of them changes it; reading the files is not needed.
"""
from __future__ import annotations

import hashlib
import os
import posixpath
import stat
from dataclasses import dataclass, field
from pathlib import Path

from popyou_cli.core.errors import PopyouError, short_error

TEXT_COLUMNS = ("prompt", "caption", "text")  # a metadata file's text: the first of these it has
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")


def image_extensions() -> frozenset[str]:
    """The extensions datasets' imagefolder builder takes as images (lower case, with the dot)."""
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    return frozenset(e.lower() for e in ImageFolder.EXTENSIONS)


@dataclass
class PictureFolder:
    """The rows of a folder of pictures (see the module docstring)."""
    root: Path
    files: list[str]  # relative posix paths, sorted: row i is files[i]
    texts: dict[str, str]  # relative path -> its text from a metadata file
    errors: dict[str, str]  # relative path -> why the row cannot hold a picture, known from the listing
    metadata: list[str]  # the metadata files read, relative
    text_column: str | None  # the metadata column the texts come from; None without metadata text
    fingerprint: str
    total_bytes: int  # of the image files
    ignored: list[str] = field(default_factory=list)  # other files, not images by their extension

    def rows(self) -> dict[str, list]:
        """Columns for datasets.Dataset.from_dict: `source` (the file's path, None when known bad), `file_name`,
        `error`, and `prompt` when there is a text column."""
        cols = {"source": [None if f in self.errors else str(self.root / f) for f in self.files],
                "file_name": list(self.files), "error": [self.errors.get(f, "") for f in self.files]}
        if self.text_column is not None:
            cols["prompt"] = [self.texts.get(f) for f in self.files]
        return cols


def _walk(root: Path) -> tuple[dict[str, os.stat_result], list[str], list[str]]:
    """(image file -> its stat, metadata files, other files), relative posix paths."""
    exts = image_extensions()
    images, metadata, other = {}, [], []

    def fail(e: OSError):
        raise PopyouError(f"cannot list the picture folder {root}: {e.filename}: {e.strerror or short_error(e)}")

    for folder, dirs, names in os.walk(root, onerror=fail):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if name.startswith("."):
                continue
            rel = Path(folder, name).relative_to(root).as_posix()
            if name in METADATA_FILES:
                metadata.append(rel)
            elif os.path.splitext(name)[1].lower() in exts:
                images[rel] = _stat(Path(folder, name))  # a FIFO or a broken link is a row too
            else:
                other.append(rel)
    return images, metadata, other


def _stat(path: Path) -> os.stat_result:
    """The file a link points to (its changes must count), or the link itself when it is broken."""
    try:
        return os.stat(path)
    except OSError:
        return os.lstat(path)


def _read_table(path: Path):
    """A metadata file as a pyarrow Table (datasets reads them with the same readers)."""
    import pyarrow as pa

    try:
        if path.suffix == ".jsonl":
            import pyarrow.json as pj

            return pj.read_json(path)
        if path.suffix == ".csv":
            import pyarrow.csv as pc

            # Every column as text: a caption "1984" or a file name "007" stays as written, not a number.
            names = pc.open_csv(path).schema.names
            return pc.read_csv(path, convert_options=pc.ConvertOptions(column_types={n: pa.string() for n in names}))
        import pyarrow.parquet as pq

        return pq.read_table(path)
    except (OSError, pa.ArrowException) as e:
        raise PopyouError(f"cannot read the metadata file {path}: {short_error(e, 160)}") from None


def _texts(root: Path, metadata: list[str]) -> tuple[dict[str, str | None], str | None]:
    """{relative image path: text} from every metadata file, and the text column used."""
    tables = [(m, _read_table(root / m)) for m in metadata]
    for m, table in tables:
        if "file_name" not in table.column_names:
            raise PopyouError(f"{root / m} has no 'file_name' column; a metadata file lists each picture's "
                              f"file_name (relative to its folder) and its text in one of {', '.join(TEXT_COLUMNS)}")
    names = {c for _, t in tables for c in t.column_names}
    column = next((c for c in TEXT_COLUMNS if c in names), None)
    texts: dict[str, str | None] = {}
    for m, table in tables:
        base = posixpath.dirname(m)
        files = table.column("file_name").to_pylist()
        values = table.column(column).to_pylist() if column in table.column_names else [None] * len(files)
        for name, value in zip(files, values):
            if name is None or not str(name).strip():
                continue  # a row without a file name names no picture
            rel = posixpath.normpath(posixpath.join(base, str(name).replace("\\", "/")))
            texts.setdefault(rel, None if value is None else str(value))
    return texts, column


def _fingerprint(root: Path, images: dict[str, os.stat_result], metadata: list[str]) -> str:
    sha = hashlib.sha256()
    entries = list(images.items()) + [(m, _stat(root / m)) for m in metadata]
    for rel, st in sorted(entries):
        sha.update(f"{rel}\t{stat.S_IFMT(st.st_mode)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return sha.hexdigest()


def _escapes(rel: str) -> bool:
    return rel.startswith(("/", "../")) or rel == ".." or "://" in rel


def read_picture_folder(root: str | os.PathLike) -> PictureFolder:
    """The rows of the picture folder `root`; a one-line PopyouError when it holds no image file."""
    shown, root = root, Path(os.path.abspath(root))
    images, metadata, other = _walk(root)
    texts, column = _texts(root, metadata)
    files = sorted(set(images) | set(texts))
    if not files:
        raise PopyouError(f"{shown} holds no image files (.png, .jpg, .webp, ...: datasets' imagefolder extensions) "
                          "and is not a dataset folder; give a folder of pictures, a stage folder (gen-data, caption) "
                          "or a save_to_disk dataset")
    errors, not_images = {}, set(other)
    for f in files:
        if _escapes(f):
            errors[f] = f"file_name '{f}' of a metadata file points outside {shown}"
        elif f in not_images:
            errors[f] = f"'{f}', listed in a metadata file, is not an image file (by its extension)"
        elif f not in images:
            errors[f] = f"'{f}' is listed in a metadata file, but there is no such file in {shown}"
    return PictureFolder(root=root, files=files, texts={f: t for f, t in texts.items() if t is not None},
                         errors=errors, metadata=metadata, text_column=column,
                         fingerprint=_fingerprint(root, images, metadata),
                         total_bytes=sum(st.st_size for st in images.values()),
                         ignored=[f for f in other if f not in texts])
