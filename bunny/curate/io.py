"""Reading the clip-retrieval embedding layout, shard by shard, with the checks that keep a coreset honest.

Layout (what clip-retrieval's ``inference`` writes, and what ``bunny curate --pool`` writes)::

    DIR/img_emb/img_emb_<i>.npy          float16/32/64, [rows, dim]
    DIR/text_emb/text_emb_<i>.npy        same rows and dim
    DIR/metadata/metadata_<i>.parquet    same rows; columns `key`, `caption` (+ `image`, `width`, `height`)

Row r of shard i is one sample everywhere. Samples are numbered globally in shard order (the
"gidx"), which is the identity every step and both engines use, so results do not depend on the
order work happens to run in.

Vectors are read with plain file reads into fresh arrays (not ``mmap``) so that memory is only the
rows asked for. Every bad input is a :class:`CurateError` naming the file and row.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

CHUNK_ROWS = 16_384  # rows read at once inside a shard: bounds memory whatever the shard size
IMAGE_COLUMNS = ("image", "image_path")  # metadata columns that name the image file, first found wins


class CurateError(ValueError):
    """Bad input or an impossible step; the message names the shard, the row and what is wrong."""


class NpyFile:
    """A C-ordered 2-D ``.npy`` file read by row ranges with ordinary reads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, fortran, dtype = read_header(f)
                self.offset = f.tell()
        except (OSError, ValueError) as exc:
            raise CurateError(f"{path}: not a readable .npy file: {exc}") from exc
        if len(shape) != 2:
            raise CurateError(f"{path}: expected a 2-D array [rows, dim], got shape {shape}")
        if fortran:
            raise CurateError(f"{path}: Fortran-ordered arrays are not supported; save it C-ordered")
        if dtype.kind != "f":
            raise CurateError(f"{path}: expected floating-point vectors, got dtype {dtype}")
        self.rows, self.dim = int(shape[0]), int(shape[1])
        self.dtype = dtype

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as float32."""
        count = (stop - start) * self.dim
        with open(self.path, "rb") as f:
            f.seek(self.offset + start * self.dim * self.dtype.itemsize)
            arr = np.fromfile(f, dtype=self.dtype, count=count)
        if arr.size != count:
            raise CurateError(f"{self.path}: file is truncated (expected {self.rows} rows of {self.dim})")
        return arr.reshape(stop - start, self.dim).astype(np.float32, copy=False)


@dataclass
class Shard:
    index: int  # the <i> in the file names
    img: NpyFile
    text: NpyFile
    meta: Path
    start: int  # gidx of row 0
    rows: int

    def where(self, row: int) -> str:
        return f"shard {self.index} row {row} (sample {self.start + row})"


@dataclass
class Layout:
    root: Path
    shards: list[Shard]
    dim: int
    meta_columns: list[str]

    @property
    def n(self) -> int:
        return self.shards[-1].start + self.shards[-1].rows if self.shards else 0

    @property
    def image_column(self) -> str | None:
        return next((c for c in IMAGE_COLUMNS if c in self.meta_columns), None)

    def shard_of(self, gidx: np.ndarray) -> np.ndarray:
        starts = np.array([s.start for s in self.shards])
        return np.searchsorted(starts, gidx, side="right") - 1


def _numbered(folder: Path, prefix: str, suffix: str) -> dict[int, Path]:
    pattern = re.compile(rf"^{re.escape(prefix)}_(\d+){re.escape(suffix)}$")
    found: dict[int, Path] = {}
    for p in folder.iterdir():
        m = pattern.match(p.name)
        if m:
            i = int(m.group(1))
            if i in found:
                raise CurateError(f"{folder}: two files for shard {i}: {found[i].name} and {p.name}")
            found[i] = p
    return found


def open_layout(root: str | Path) -> Layout:
    """Index the shards under ``root`` and check that they line up (files, rows, dimensions)."""
    root = Path(root)
    parts = {"img": ("img_emb", "img_emb", ".npy"), "text": ("text_emb", "text_emb", ".npy"),
             "meta": ("metadata", "metadata", ".parquet")}
    files: dict[str, dict[int, Path]] = {}
    for kind, (sub, prefix, suffix) in parts.items():
        folder = root / sub
        if not folder.is_dir():
            raise CurateError(
                f"{root}: missing folder {sub}/ (expected the clip-retrieval layout: img_emb/img_emb_<i>.npy, "
                "text_emb/text_emb_<i>.npy, metadata/metadata_<i>.parquet)"
            )
        files[kind] = _numbered(folder, prefix, suffix)
    indices = sorted(set().union(*files.values()))
    if not indices:
        raise CurateError(f"{root}: no shards found under img_emb/, text_emb/, metadata/")
    for i in indices:
        for kind, (sub, prefix, suffix) in parts.items():
            if i not in files[kind]:
                raise CurateError(f"{root}: shard {i} has no {sub}/{prefix}_{i}{suffix}")
    shards: list[Shard] = []
    dim = None
    columns: list[str] | None = None
    start = 0
    for i in indices:
        img, text = NpyFile(files["img"][i]), NpyFile(files["text"][i])
        try:
            pf = pq.ParquetFile(files["meta"][i])
        except (OSError, pa.ArrowException) as exc:
            raise CurateError(f"{files['meta'][i]}: not a readable parquet file: {exc}") from exc
        meta_rows = pf.metadata.num_rows
        if not img.rows == text.rows == meta_rows:
            raise CurateError(
                f"shard {i}: row counts differ: {img.path.name} has {img.rows}, {text.path.name} has "
                f"{text.rows}, {files['meta'][i].name} has {meta_rows} (row r of each must be one sample)"
            )
        if img.dim != text.dim:
            raise CurateError(
                f"shard {i}: image vectors have dim {img.dim} ({img.path.name}) but text vectors have dim "
                f"{text.dim} ({text.path.name}); both must come from one CLIP-like model"
            )
        if dim is None:
            dim = img.dim
        elif img.dim != dim:
            raise CurateError(f"shard {i}: dim {img.dim} ({img.path.name}) differs from shard {indices[0]}'s {dim}")
        names = pf.schema_arrow.names
        if "key" not in names:
            raise CurateError(f"{files['meta'][i]}: no `key` column (columns: {', '.join(names)})")
        if columns is None:
            columns = names
        shards.append(Shard(i, img, text, files["meta"][i], start, img.rows))
        start += img.rows
    assert dim is not None and columns is not None
    return Layout(root, shards, dim, columns)


def read_meta(shard: Shard, columns: list[str]) -> pa.Table:
    try:
        table = pq.read_table(shard.meta, columns=columns)
    except (OSError, pa.ArrowException) as exc:
        raise CurateError(f"{shard.meta}: cannot read columns {columns}: {exc}") from exc
    # keys are strings whatever the writer used (img2dataset writes zero-padded strings; ints happen)
    if "key" in columns and not pa.types.is_string(table.schema.field("key").type):
        table = table.set_column(table.schema.get_field_index("key"), "key", pc.cast(table["key"], pa.string()))
    return table


def check_unique_keys(layout: Layout, keys: pa.ChunkedArray) -> None:
    """Raise naming both places when a key occurs twice."""
    if pc.count_distinct(keys, mode="all").as_py() == len(keys):
        return
    nulls = np.flatnonzero(keys.is_null().to_numpy(zero_copy_only=False))
    if nulls.size:
        raise CurateError(f"{_where(layout, int(nulls[0]))}: the key is empty (null)")
    import pandas as pd

    series = pd.Series(keys.to_numpy(zero_copy_only=False))
    dup = np.flatnonzero(series.duplicated(keep=False).to_numpy())
    first_key = series.iloc[dup[0]]
    same = dup[series.iloc[dup].to_numpy() == first_key]
    raise CurateError(
        f"duplicate key {first_key!r}: {_where(layout, int(same[0]))} and {_where(layout, int(same[1]))} "
        f"({len(dup)} rows have a key that occurs more than once); keys must be unique"
    )


def _where(layout: Layout, gidx: int) -> str:
    shard = layout.shards[int(layout.shard_of(np.array([gidx]))[0])]
    return f"{shard.meta.name} {shard.where(gidx - shard.start)}"


def normalize_checked(x: np.ndarray, path: Path, rows: np.ndarray, shard: Shard) -> np.ndarray:
    """L2-normalise float32 rows (shard-local row numbers ``rows``); NaN/inf or zero rows raise naming them.

    Norms are taken in float64 so the result is the same whatever batch or engine a row is in.
    """
    x64 = x.astype(np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", x64, x64))
    bad = ~np.isfinite(norms)
    if bad.any():
        r = int(rows[np.flatnonzero(bad)[0]])
        raise CurateError(f"{path}: {shard.where(r)} has NaN or infinite values ({int(bad.sum())} such rows here)")
    zero = norms < 1e-12
    if zero.any():
        r = int(rows[np.flatnonzero(zero)[0]])
        raise CurateError(f"{path}: {shard.where(r)} is an all-zero vector ({int(zero.sum())} such rows here)")
    return (x64 / norms[:, None]).astype(np.float32)


def iter_chunks(shard: Shard, chunk_rows: int = CHUNK_ROWS) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(first row, normalised image vectors, normalised text vectors) for each chunk of a shard."""
    for r0 in range(0, shard.rows, chunk_rows):
        r1 = min(shard.rows, r0 + chunk_rows)
        rows = np.arange(r0, r1)
        img = normalize_checked(shard.img.read(r0, r1), shard.img.path, rows, shard)
        txt = normalize_checked(shard.text.read(r0, r1), shard.text.path, rows, shard)
        yield r0, img, txt


def read_rows(layout: Layout, gidx: np.ndarray, chunk_rows: int = CHUNK_ROWS) -> np.ndarray:
    """Normalised image vectors of the (sorted) global rows ``gidx``."""
    out = np.empty((len(gidx), layout.dim), dtype=np.float32)
    shard_ids = layout.shard_of(gidx)
    for s in np.unique(shard_ids):
        shard = layout.shards[s]
        pos = np.flatnonzero(shard_ids == s)
        local = gidx[pos] - shard.start
        for r0 in range(0, shard.rows, chunk_rows):
            r1 = min(shard.rows, r0 + chunk_rows)
            sel = (local >= r0) & (local < r1)
            if not sel.any():
                continue
            rows = local[sel]
            block = shard.img.read(int(rows[0]), int(rows[-1]) + 1)
            out[pos[sel]] = normalize_checked(block[rows - rows[0]], shard.img.path, rows, shard)
    return out


def write_shard(root: str | Path, index: int, img: np.ndarray, txt: np.ndarray, meta: dict) -> None:
    """Write one shard of the layout (metadata last: its presence marks the shard complete)."""
    root = Path(root)
    for sub in ("img_emb", "text_emb", "metadata"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    np.save(root / "img_emb" / f"img_emb_{index}.npy", img)
    np.save(root / "text_emb" / f"text_emb_{index}.npy", txt)
    tmp = root / "metadata" / f".metadata_{index}.parquet.tmp"
    pq.write_table(pa.table(meta), tmp)
    tmp.rename(root / "metadata" / f"metadata_{index}.parquet")
