"""Reading the clip-retrieval embedding layout, shard by shard, with the checks that keep a coreset honest.

Layout (what clip-retrieval's ``inference`` writes, and what ``bunny curate --pool`` writes)::

    DIR/img_emb/img_emb_<i>.npy          float16/32/64, [rows, dim]
    DIR/text_emb/text_emb_<i>.npy        same rows and dim
    DIR/metadata/metadata_<i>.parquet    same rows; columns `key`, `caption` (+ `image`, `width`, `height`)

Instead of a ``.npy`` file, a shard's vectors may be a parquet file (``img_emb_<i>.parquet``) with a
list-of-floats column ``embedding`` (or its only list column) and an id column ``key`` or ``id``, as
embedding-reader's parquet format stores them; the ids must equal the metadata keys row by row.
The metadata's key column is ``key``, else ``id``, else ``image_path`` (clip-retrieval's ``files``
input has no ``key``).

Row r of shard i is one sample everywhere. Samples are numbered globally in shard order (the
"gidx"), which is the identity every step and both engines use, so results do not depend on the
order work happens to run in.

Vectors are read with plain file reads into fresh arrays, so that memory is only the rows asked
for (the k-means sample is gathered through a short-lived memory map, touching only its pages). Every bad input is a :class:`CurateError` naming the file, the shard and the row.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

log = logging.getLogger(__name__)
CHUNK_ROWS = 16_384  # rows read at once inside a shard: bounds memory whatever the shard size
IMAGE_COLUMNS = ("image", "image_path")  # metadata columns that name the image file, first found wins
KEY_COLUMNS = ("key", "id", "image_path")  # metadata columns that identify a sample, first found wins
VECTOR_ID_COLUMNS = ("key", "id")  # id column of a parquet vector file
_TINY = 1e-30  # squared norms below this (or not finite) are re-checked in float64


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
        if fortran and shape[0] > 1 and shape[1] > 1:
            raise CurateError(f"{path}: Fortran-ordered arrays are not supported; save it C-ordered")
        if dtype.kind != "f":
            raise CurateError(f"{path}: expected floating-point vectors, got dtype {dtype}")
        self.rows, self.dim = int(shape[0]), int(shape[1])
        self.dtype = dtype

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as a fresh, writable float32 array."""
        count = (stop - start) * self.dim
        with open(self.path, "rb") as f:
            f.seek(self.offset + start * self.dim * self.dtype.itemsize)
            arr = np.fromfile(f, dtype=self.dtype, count=count)
        if arr.size != count:
            raise CurateError(f"{self.path}: file is truncated (expected {self.rows} rows of {self.dim})")
        return arr.reshape(stop - start, self.dim).astype(np.float32, copy=False)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The (sorted) rows ``rows`` as float32, reading only the pages that hold them."""
        mm = np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset, shape=(self.rows, self.dim))
        try:
            return np.array(mm[rows], dtype=np.float32)
        finally:
            del mm

    def ids(self) -> None:
        return None


class ParquetVectors:
    """Vectors stored as a list column of a parquet file, read by row groups (one group cached)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.file = pq.ParquetFile(path)
        except (OSError, pa.ArrowException) as exc:
            raise CurateError(f"{path}: not a readable parquet file: {exc}") from exc
        schema = self.file.schema_arrow
        lists = [f.name for f in schema if pa.types.is_list(f.type) or pa.types.is_large_list(f.type)
                 or pa.types.is_fixed_size_list(f.type)]
        if "embedding" in lists:
            self.column = "embedding"
        elif len(lists) == 1:
            self.column = lists[0]
        else:
            raise CurateError(f"{path}: expected one list-of-floats column named `embedding` "
                              f"(columns: {', '.join(schema.names)})")
        value_type = schema.field(self.column).type.value_type
        if not pa.types.is_floating(value_type):
            raise CurateError(f"{path}: column `{self.column}` holds {value_type}, expected floats")
        self.id_column = next((c for c in VECTOR_ID_COLUMNS if c in schema.names), None)
        if self.id_column is None:
            raise CurateError(f"{path}: no id column (`key` or `id`) to match rows with the metadata "
                              f"(columns: {', '.join(schema.names)})")
        meta = self.file.metadata
        self.rows = meta.num_rows
        self.group_starts = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
        self._cache: tuple[int, np.ndarray] | None = None
        self.dim = self._group(int(np.searchsorted(self.group_starts, 0, side="right") - 1)).shape[1] \
            if self.rows else 0

    def _group(self, g: int) -> np.ndarray:
        if self._cache is not None and self._cache[0] == g:
            return self._cache[1]
        try:
            col = self.file.read_row_group(g, columns=[self.column])[self.column].combine_chunks()
        except (OSError, pa.ArrowException) as exc:
            raise CurateError(f"{self.path}: cannot read row group {g}: {exc}") from exc
        start = int(self.group_starts[g])
        if col.null_count:
            row = start + int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
            raise CurateError(f"{self.path}: row {row} has no vector (null)")
        if pa.types.is_fixed_size_list(col.type):
            dim = col.type.list_size
        else:
            lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
            dim = int(lengths[0]) if len(lengths) else getattr(self, "dim", 0)
            ref = getattr(self, "dim", dim)
            off = np.flatnonzero(lengths != ref)
            if off.size:
                r = int(off[0])
                raise CurateError(f"{self.path}: row {start + r} has {int(lengths[r])} values, expected {ref} "
                                  "(every vector must have the same dimension)")
        values = col.flatten().to_numpy(zero_copy_only=False)
        arr = np.array(values, dtype=np.float32).reshape(len(col), dim)
        self._cache = (g, arr)
        return arr

    def read(self, start: int, stop: int) -> np.ndarray:
        first = int(np.searchsorted(self.group_starts, start, side="right") - 1)
        last = int(np.searchsorted(self.group_starts, stop - 1, side="right") - 1)
        parts = []
        for g in range(first, last + 1):
            g0 = int(self.group_starts[g])
            block = self._group(g)
            parts.append(block[max(start, g0) - g0 : min(stop, g0 + len(block)) - g0])
        return np.concatenate(parts) if len(parts) > 1 else parts[0].copy()

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The (sorted) rows ``rows`` as float32, one row group at a time."""
        group = np.searchsorted(self.group_starts, rows, side="right") - 1
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        for g in np.unique(group):
            sel = np.flatnonzero(group == g)
            out[sel] = self._group(int(g))[rows[sel] - self.group_starts[g]]
        return out

    def ids(self) -> pa.ChunkedArray:
        return pc.cast(self.file.read(columns=[self.id_column])[self.id_column], pa.string())


VectorFile = NpyFile | ParquetVectors


def open_vectors(path: Path) -> VectorFile:
    return ParquetVectors(path) if path.suffix == ".parquet" else NpyFile(path)


@dataclass
class Shard:
    index: int  # the <i> in the file names
    img: VectorFile
    text: VectorFile
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
    key_column: str

    @property
    def n(self) -> int:
        return self.shards[-1].start + self.shards[-1].rows if self.shards else 0

    @property
    def image_column(self) -> str | None:
        return next((c for c in IMAGE_COLUMNS if c in self.meta_columns), None)

    def shard_of(self, gidx: np.ndarray) -> np.ndarray:
        starts = np.array([s.start for s in self.shards])
        return np.searchsorted(starts, gidx, side="right") - 1


def _numbered(folder: Path, prefix: str, suffixes: tuple[str, ...]) -> dict[int, Path]:
    pattern = re.compile(rf"^{re.escape(prefix)}_(\d+)({'|'.join(re.escape(s) for s in suffixes)})$")
    found: dict[int, Path] = {}
    for p in sorted(folder.iterdir()):
        m = pattern.match(p.name)
        if m:
            i = int(m.group(1))
            if i in found:
                raise CurateError(f"{folder}: two files for shard {i}: {found[i].name} and {p.name}")
            found[i] = p
    return found


PARTS = {"img": ("img_emb", "img_emb", (".npy", ".parquet")), "text": ("text_emb", "text_emb", (".npy", ".parquet")),
         "meta": ("metadata", "metadata", (".parquet",))}


def open_layout(root: str | Path) -> Layout:
    """Index the shards under ``root`` and check that they line up (files, rows, dimensions)."""
    root = Path(root)
    if not root.is_dir():
        raise CurateError(f"{root}: no such folder (expected embeddings in the clip-retrieval layout)")
    files: dict[str, dict[int, Path]] = {}
    for kind, (sub, prefix, suffixes) in PARTS.items():
        folder = root / sub
        if not folder.is_dir():
            raise CurateError(
                f"{root}: missing folder {sub}/ (expected the clip-retrieval layout: img_emb/img_emb_<i>.npy, "
                "text_emb/text_emb_<i>.npy, metadata/metadata_<i>.parquet)"
            )
        files[kind] = _numbered(folder, prefix, suffixes)
    indices = sorted(set().union(*files.values()))
    if not indices:
        raise CurateError(f"{root}: no shards found under img_emb/, text_emb/, metadata/")
    for i in indices:
        for kind, (sub, prefix, suffixes) in PARTS.items():
            if i not in files[kind]:
                raise CurateError(f"{root}: shard {i} has no {sub}/{prefix}_{i}{'|'.join(suffixes)}")
    shards: list[Shard] = []
    dim = None
    columns: list[str] | None = None
    start = 0
    for i in indices:
        img, text = open_vectors(files["img"][i]), open_vectors(files["text"][i])
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
        if img.rows and img.dim != text.dim:
            raise CurateError(
                f"shard {i}: image vectors have dim {img.dim} ({img.path.name}) but text vectors have dim "
                f"{text.dim} ({text.path.name}); both must come from one CLIP-like model"
            )
        if img.rows:
            if dim is None:
                dim = img.dim
            elif img.dim != dim:
                first = next(s for s in shards if s.rows)
                raise CurateError(f"shard {i}: dim {img.dim} ({img.path.name}) differs from shard {first.index}'s "
                                  f"dim {dim} ({first.img.path.name})")
        names = pf.schema_arrow.names
        key_col = next((c for c in KEY_COLUMNS if c in names), None)
        if key_col is None:
            raise CurateError(f"{files['meta'][i]}: no `key` column (columns: {', '.join(names)})")
        if columns is None:
            columns, key_column = names, key_col
        elif key_col != key_column:
            raise CurateError(f"{files['meta'][i]}: the key column is `{key_col}` but shard {indices[0]} uses "
                              f"`{key_column}`")
        if not img.rows:  # legitimate (every image of a shard unreadable), but never silent
            log.warning("shard %d is empty (0 rows in %s, %s, %s)", i, img.path.name, text.path.name,
                        files["meta"][i].name)
        shards.append(Shard(i, img, text, files["meta"][i], start, img.rows))
        start += img.rows
    if dim is None:
        raise CurateError(f"{root}: every shard is empty (0 rows)")
    assert columns is not None
    return Layout(root, shards, dim, columns, key_column)


def read_meta(layout: Layout, shard: Shard, columns: list[str]) -> pa.Table:
    """Metadata columns of a shard; the layout's key column comes back as a string column ``key``."""
    names = [layout.key_column if c == "key" else c for c in columns]
    try:
        table = pq.read_table(shard.meta, columns=names)
    except (OSError, pa.ArrowException) as exc:
        raise CurateError(f"{shard.meta}: cannot read columns {names}: {exc}") from exc
    if "key" in columns:
        # keys are strings whatever the writer used (img2dataset writes zero-padded strings; ints happen)
        keys = pc.cast(table[layout.key_column], pa.string())
        table = table.set_column(names.index(layout.key_column), "key", keys)
        for vec in (shard.img, shard.text):
            ids = vec.ids()
            if ids is None:
                continue
            differ = np.flatnonzero(~pc.fill_null(pc.equal(ids, keys), False).to_numpy(zero_copy_only=False))
            if differ.size:
                r = int(differ[0])
                raise CurateError(f"{vec.path}: {shard.where(r)} has id {ids[r].as_py()!r} but {shard.meta.name} "
                                  f"has key {keys[r].as_py()!r} ({differ.size} rows differ); rows must line up")
    return table


def check_unique_keys(layout: Layout, keys: pa.ChunkedArray, extra: pa.ChunkedArray | None = None) -> None:
    """Raise naming both places when a key occurs twice (``extra``: keys dropped before embedding)."""
    everything = keys if extra is None else pa.chunked_array(keys.chunks + extra.chunks, type=pa.string())
    nulls = np.flatnonzero(keys.is_null().to_numpy(zero_copy_only=False))
    if nulls.size:
        raise CurateError(f"{_where(layout, int(nulls[0]))}: the key is empty (null)")
    if pc.count_distinct(everything, mode="all").as_py() == len(everything):
        return
    import pandas as pd

    series = pd.Series(everything.to_numpy(zero_copy_only=False))
    dup = np.flatnonzero(series.duplicated(keep=False).to_numpy())
    first_key = series.iloc[dup[0]]
    same = dup[series.iloc[dup].to_numpy() == first_key]

    def place(i: int) -> str:
        return _where(layout, i) if i < len(keys) else "the samples dropped before embedding"

    raise CurateError(
        f"duplicate key {first_key!r}: {place(int(same[0]))} and {place(int(same[1]))} "
        f"({len(dup)} rows have a key that occurs more than once); keys must be unique"
    )


def _where(layout: Layout, gidx: int) -> str:
    shard = layout.shards[int(layout.shard_of(np.array([gidx]))[0])]
    return f"{shard.meta.name} {shard.where(gidx - shard.start)}"


def row_norms(x: np.ndarray, path: Path, rows: np.ndarray, shard: Shard) -> np.ndarray:
    """L2 norms (float32) of float32 rows; NaN/inf or all-zero rows raise naming the first of them.

    The fast path is float32; rows whose squared norm over- or underflows there are redone in float64.
    ``rows`` are the shard-local row numbers of ``x``.
    """
    sq = np.einsum("ij,ij->i", x, x)
    odd = np.flatnonzero(~np.isfinite(sq) | (sq < _TINY))
    norms = np.sqrt(sq)
    if odd.size:
        sub = x[odd].astype(np.float64)
        finite = np.isfinite(sub).all(axis=1)
        if not finite.all():
            r = int(rows[odd[np.flatnonzero(~finite)[0]]])
            raise CurateError(f"{path}: {shard.where(r)} has NaN or infinite values "
                              f"({int((~finite).sum())} such rows in this chunk)")
        scale = np.abs(sub).max(axis=1)
        zero = scale == 0
        if zero.any():
            r = int(rows[odd[np.flatnonzero(zero)[0]]])
            raise CurateError(f"{path}: {shard.where(r)} is an all-zero vector ({int(zero.sum())} such rows in this "
                              "chunk); it has no direction to compare")
        # scaled so that neither huge nor tiny values over- or underflow; then back to float32 if it fits
        n64 = scale * np.linalg.norm(sub / scale[:, None], axis=1)
        if (n64 > np.finfo(np.float32).max).any() or (n64 < np.finfo(np.float32).tiny).any():
            r = int(rows[odd[0]])
            raise CurateError(f"{path}: {shard.where(r)} has a norm of {n64[0]:.3g}, outside float32's range")
        norms[odd] = n64
    return norms


def normalize_checked(x: np.ndarray, path: Path, rows: np.ndarray, shard: Shard) -> np.ndarray:
    """``x`` (a fresh float32 array, changed in place) divided by its row norms; see :func:`row_norms`."""
    x /= row_norms(x, path, rows, shard)[:, None]
    return x


def iter_chunks(shard: Shard, chunk_rows: int = CHUNK_ROWS) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(first row, normalised image vectors, image-text cosine) for each chunk of a shard.

    Every row is checked, including rows an earlier filter dropped: a NaN is a broken file, not a
    sample to filter.
    """
    for r0 in range(0, shard.rows, chunk_rows):
        r1 = min(shard.rows, r0 + chunk_rows)
        rows = np.arange(r0, r1)
        img = normalize_checked(shard.img.read(r0, r1), shard.img.path, rows, shard)
        txt = shard.text.read(r0, r1)
        it_sim = np.einsum("ij,ij->i", img, txt) / row_norms(txt, shard.text.path, rows, shard)
        yield r0, img, it_sim


def read_rows(layout: Layout, gidx: np.ndarray, chunk_rows: int = CHUNK_ROWS) -> np.ndarray:
    """Normalised image vectors of the (sorted) global rows ``gidx``, read without the rows between."""
    out = np.empty((len(gidx), layout.dim), dtype=np.float32)
    shard_ids = layout.shard_of(gidx)
    for s in np.unique(shard_ids):
        shard = layout.shards[s]
        pos = np.flatnonzero(shard_ids == s)
        for i in range(0, len(pos), chunk_rows):
            part = pos[i : i + chunk_rows]
            rows = gidx[part] - shard.start
            out[part] = normalize_checked(shard.img.take(rows), shard.img.path, rows, shard)
    return out


def write_shard(root: str | Path, index: int, img: np.ndarray, txt: np.ndarray, meta: dict) -> None:
    """Write one shard of the layout (metadata last, by rename: its presence marks the shard complete)."""
    root = Path(root)
    for sub in ("img_emb", "text_emb", "metadata"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    np.save(root / "img_emb" / f"img_emb_{index}.npy", img)
    np.save(root / "text_emb" / f"text_emb_{index}.npy", txt)
    tmp = root / "metadata" / f".metadata_{index}.parquet.tmp"
    pq.write_table(pa.table(meta), tmp)
    tmp.rename(root / "metadata" / f"metadata_{index}.parquet")
