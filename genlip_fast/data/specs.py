"""Shard specs as users write them: the list of shard files a ``data.train_shards`` (or a source's ``path``) names.

::

    /data/s1/{000000..099999}.tar          brace range (zero padding kept), as webdataset and open_clip write it
    /data/{cc3m,cc12m}/{00000..00099}.tar  several braces, lists inside braces (nested braces too)
    /data/laion/**/*.tar                   glob; ``**`` crosses folders
    /data/laion                            a folder: every shard under it, searched recursively
    /data/a/*.tar,/data/b/x.tar            comma-separated parts (commas inside braces belong to the braces)
    s3://bucket/s1/{00000..00099}.tar      the same for any fsspec URL (s3://, gs://, http(s)://, ...)

A shard is a ``.tar`` (webdataset) or ``.parquet`` file. Folders and globs take only those and leave out the rest
(index sidecars, manifests, images, ``*_stats.json``); an img2dataset folder holds ``NNNNN.parquet`` metadata
(URLs, captions, no images) beside each ``NNNNN.tar``, so a ``.parquet`` with a ``.tar`` of the same name beside it
is never a shard. A path named outright is taken whatever its name. The result is sorted within each comma-separated
part, parts in the order given, and a shard named twice is read once (the data position's digest depends on this
order, so it is deterministic).

Every part must match something: a part that matches nothing is an error saying what it looked for (the expanded
pattern, the missing files of a brace range, the folder searched). Compressed tars (``.tar.gz``, ``.tgz``,
``.tar.zst``, ``.tar.bz2``, ``.tar.xz``) are refused with the command that decompresses them: a sample is read by
its byte offset in the tar, which a compressed stream does not have (so no exact resume without reading from the
start).

Local paths stay plain paths (as written, relative or absolute; ``file://`` URLs become paths); other URLs are listed
through fsspec (:mod:`~genlip_fast.data.storage`: retries, one clear error for a missing backend or credentials) and
come back as URLs with their protocol.
"""

from __future__ import annotations

import glob
import logging
import os
import re

from . import storage

log = logging.getLogger(__name__)

SHARD_SUFFIXES = (".tar", ".parquet")
"""What a folder or glob search takes as a shard."""
COMPRESSED_SUFFIXES = {
    ".tar.gz": ("gzip", '"${f%.gz}"'), ".tgz": ("gzip", '"${f%.tgz}.tar"'), ".tar.zst": ("zstd", '"${f%.zst}"'),
    ".tar.bz2": ("bzip2", '"${f%.bz2}"'), ".tar.xz": ("xz", '"${f%.xz}"'),
}
"""Compressed tar suffixes: the tool that decompresses each and the shell expression of the ``.tar`` it writes."""
GLOB_CHARS = "*?["
MAX_BRACE_PATHS = 10_000_000
LIST_PARENT_AT = 16
"""Brace expansions naming this many files in one folder check them with one listing of the folder instead of one
``stat`` (or one request) each."""


class ShardSpecError(ValueError):
    """A shard spec that cannot be used (bad syntax, compressed shards)."""


class NoShardsError(ShardSpecError, FileNotFoundError):
    """A shard spec, or a part of it, matches no shard."""


class CompressedShardsError(ShardSpecError):
    """The spec names compressed tars, which cannot be read by byte offset."""


def _split_commas(text: str) -> list[str]:
    """``text`` split at the commas outside braces (empty items kept)."""
    items, depth, start = [], 0, 0
    for i, c in enumerate(text):
        if c == "{":
            depth += 1
        elif c == "}" and depth:
            depth -= 1
        elif c == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    return items + [text[start:]]


def split_sources(spec: str) -> list[str]:
    """``"p1;p2"`` -> ``["p1", "p2"]``: the authors' form of several sources in one ``data.train_shards`` (each
    part a spec of its own)."""
    return [p.strip() for p in str(spec).split(";") if p.strip()]


def split_parts(spec: str) -> list[str]:
    """``"a/{1,2}.tar, b/*.tar"`` -> ``["a/{1,2}.tar", "b/*.tar"]``: commas outside braces separate parts."""
    return [p.strip() for p in _split_commas(spec) if p.strip()]


_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?")


def _matching_brace(s: str, start: int) -> int:
    depth = 0
    for i in range(start, len(s)):
        if s[i] == "{":
            depth += 1
        elif s[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    return -1


def _range(text: str, m: re.Match) -> list[str]:
    a, b = int(m.group(1)), int(m.group(2))
    step = abs(int(m.group(3) or 1))
    if step == 0:
        raise ShardSpecError(f"brace range {{{text}}} has a step of 0")
    n = abs(b - a) // step + 1
    if n > MAX_BRACE_PATHS:
        raise ShardSpecError(f"brace range {{{text}}} names {n:,} paths (at most {MAX_BRACE_PATHS:,})")
    # zero padding as bash and braceexpand: when either end is written with a leading zero, pad to the longer end
    padded = any(len(g.lstrip("-")) > 1 and g.lstrip("-").startswith("0") for g in m.group(1, 2))
    width = max(len(m.group(1)), len(m.group(2))) if padded else 0
    values = range(a, b + (1 if b >= a else -1), step if b >= a else -step)
    return [f"{v:0{width}d}" for v in values]


def expand_braces(pattern: str) -> list[str]:
    """Brace expansion as the shell (and webdataset's ``braceexpand``) does it: ``{000..003}`` (padding kept, an
    optional ``..step``), ``{a,b,c}``, several and nested braces; a brace without a comma or range stays literal.
    Order: left to right, as written."""
    start = pattern.find("{")
    while start >= 0:
        end = _matching_brace(pattern, start)
        if end < 0:
            return [pattern]  # an unmatched brace is a literal character
        inner = pattern[start + 1:end]
        m = _RANGE.fullmatch(inner)
        if m:
            alts = _range(inner, m)
        else:
            items = _split_commas(inner)  # {a,,b} keeps the empty item, as the shell does
            if len(items) > 1:
                alts = [a for item in items for a in expand_braces(item)]
            else:  # "{abc}": literal; look for braces after it
                start = pattern.find("{", start + 1)
                continue
        head, tails = pattern[:start], expand_braces(pattern[end + 1:])
        out = [head + a + t for a in alts for t in tails]
        if len(out) > MAX_BRACE_PATHS:
            raise ShardSpecError(f"{pattern!r} names {len(out):,} paths (at most {MAX_BRACE_PATHS:,})")
        return out
    return [pattern]


class _LocalFS:
    """Plain local paths, kept as written (fsspec's local filesystem would make them absolute)."""

    def isfile(self, p: str) -> bool:
        return os.path.isfile(p)

    def isdir(self, p: str) -> bool:
        return os.path.isdir(p)

    def glob(self, p: str) -> list[str]:
        return glob.glob(p, recursive=True)

    def find(self, d: str) -> list[str]:
        out = []
        for root, dirs, files in os.walk(d, followlinks=True):
            dirs[:] = [x for x in dirs if not x.startswith(".")]
            out += [os.path.join(root, f) for f in files]
        return out

    def entries(self, d: str) -> dict[str, bool] | None:
        """``{name: is a folder}`` of folder ``d``; None when it is not a folder."""
        try:
            with os.scandir(d or ".") as it:
                return {e.name: e.is_dir() for e in it}
        except (FileNotFoundError, NotADirectoryError):
            return None


class _RemoteFS:
    """Any fsspec filesystem through :mod:`~genlip_fast.data.storage` (its setup errors, retries and credential
    messages); paths go in and come out as URLs with their protocol. A missing object or folder is just missing."""

    def __init__(self, url: str):
        self.url = url
        self.fs, _ = storage.filesystem(url)

    def _call(self, fn, what: str):
        return storage.retrying(self.url, fn, what)

    def _strip(self, p: str) -> str:
        return self.fs._strip_protocol(p)

    def isfile(self, p: str) -> bool:
        try:
            return bool(self._call(lambda: self.fs.isfile(self._strip(p)), "stat"))
        except FileNotFoundError:
            return False

    def isdir(self, p: str) -> bool:
        try:
            return bool(self._call(lambda: self.fs.isdir(self._strip(p)), "stat"))
        except FileNotFoundError:
            return False

    def glob(self, p: str) -> list[str]:
        try:
            return [self.fs.unstrip_protocol(x) for x in self._call(lambda: self.fs.glob(self._strip(p)), "list")]
        except FileNotFoundError:
            return []

    def find(self, d: str) -> list[str]:
        return [self.fs.unstrip_protocol(x) for x in self._call(lambda: self.fs.find(self._strip(d)), "list")]

    def entries(self, d: str) -> dict[str, bool] | None:
        try:
            listed = self._call(lambda: self.fs.ls(self._strip(d), detail=True), "list")
        except (FileNotFoundError, NotADirectoryError):
            return None
        return {x["name"].rstrip("/").rsplit("/", 1)[-1]: x["type"] == "directory" for x in listed}


def _suffix(path: str) -> str:
    """The shard or compressed suffix ``path`` ends with ('' if none)."""
    low = path.lower()
    return next((s for s in (*COMPRESSED_SUFFIXES, *SHARD_SUFFIXES) if low.endswith(s)), "")


def _shards_among(files: list[str], fs) -> tuple[list[str], int]:
    """The shards among files found by a folder or glob search: shard and compressed suffixes only, no hidden
    files, and no img2dataset metadata (a ``.parquet`` with a ``.tar`` of the same name beside it); and how many
    such metadata files were left out."""
    keep = [f for f in files if _suffix(f) and not storage.name(f).startswith(".")]
    parquets = [f for f in keep if f.lower().endswith(".parquet")]
    if not parquets:
        return keep, 0
    tars = {f for f in keep if f.lower().endswith(".tar")}
    listed: dict[str, dict[str, bool]] = {}  # one listing per folder, not one request per file
    meta = set()
    for f in parquets:
        tar = f[: -len(".parquet")] + ".tar"
        parent = storage.parent(f)
        if parent not in listed:
            listed[parent] = fs.entries(parent) or {}
        if tar in tars or storage.name(tar) in listed[parent]:
            meta.add(f)
    return [f for f in keep if f not in meta], len(meta)


def _kinds(paths: list[str], fs) -> dict[str, str]:
    """``{path: "file" | "dir" | "missing"}`` for paths without glob characters; many paths in one folder are
    checked with one listing of it."""
    out: dict[str, str] = {}
    by_parent: dict[str, list[str]] = {}
    for p in paths:
        by_parent.setdefault(storage.parent(p), []).append(p)
    for parent, group in by_parent.items():
        if len(group) >= LIST_PARENT_AT:
            listed = fs.entries(parent) or {}
            for p in group:
                is_dir = listed.get(storage.name(p))
                out[p] = "missing" if is_dir is None else ("dir" if is_dir else "file")
        else:
            for p in group:
                out[p] = "file" if fs.isfile(p) else ("dir" if fs.isdir(p) else "missing")
    return out


def _filesystem(path: str) -> tuple[_LocalFS | _RemoteFS, str]:
    """The filesystem ``path`` is on, and ``path`` as it lists there (``file://`` URLs are local paths)."""
    return (_RemoteFS(path), path) if storage.is_remote(path) else (_LocalFS(), storage.local_path(path))


def folder_shards(folder: str) -> list[str]:
    """The shards directly in ``folder`` (not below it), sorted, taken as a folder search takes them: ``.tar`` and
    ``.parquet`` files, no hidden files, no img2dataset metadata (what a folder's manifest lists)."""
    fs, folder = _filesystem(folder)
    found = [f for suffix in SHARD_SUFFIXES for f in fs.glob(storage.join(folder, "*" + suffix))]
    return sorted(_shards_among(found, fs)[0])


def _expand_part(part: str) -> list[str]:
    fs, part = _filesystem(part)
    patterns = expand_braces(part)
    literal = [p for p in patterns if not any(c in p for c in GLOB_CHARS)]
    kinds = _kinds(literal, fs)
    out: list[str] = []
    missing: list[str] = []
    searched: list[tuple[str, int]] = []  # folders and globs that found no shard (and img2dataset metadata seen)
    for p in patterns:
        kind = kinds.get(p)
        if kind == "file":
            out.append(p)
        elif kind == "missing":
            missing.append(p)
        else:  # a folder, or a glob (whose matched folders are searched too)
            matches = [p] if kind == "dir" else fs.glob(p)
            found, meta = [], 0
            for m in matches:
                shards, dropped = _shards_among(fs.find(m) if fs.isdir(m) else [m], fs)
                found += shards
                meta += dropped
            if not found:
                searched.append((p, meta))
            out += found
    if missing or searched:
        raise NoShardsError(_nothing_found(part, patterns, missing, searched))
    return sorted(set(out))


def _nothing_found(part: str, patterns: list[str], missing: list[str], searched: list[tuple[str, int]]) -> str:
    what = []
    if missing:
        shown = ", ".join(repr(m) for m in missing[:3]) + (" ..." if len(missing) > 3 else "")
        if len(patterns) > 1:
            count = (f"none of the {len(patterns):,} paths its braces name exists" if len(missing) == len(patterns)
                     else f"{len(missing):,} of the {len(patterns):,} paths its braces name do not exist")
            what.append(f"{count} ({shown}); a glob (*) takes whatever is there")
        else:
            what.append(f"no file or folder {shown}")
    for s, meta in searched[:3]:
        kind = "folder" if not any(c in s for c in GLOB_CHARS) else "glob"
        what.append(f"{kind} {s!r} {'holds' if kind == 'folder' else 'matches'} no shard ("
                    f"{' or '.join(SHARD_SUFFIXES)}{', searched recursively' if kind == 'folder' else ''})"
                    + (f"; only {meta} img2dataset metadata file(s) (NNNNN.parquet beside the NNNNN.tar that holds "
                       "the images): point at the .tar files" if meta else ""))
    if len(searched) > 3:
        what.append(f"and {len(searched) - 3} more patterns found nothing")
    return f"no shard at {part!r}: " + "; ".join(what)


def _refuse_compressed(shards: list[str]) -> None:
    bad = [s for s in shards if _suffix(s) in COMPRESSED_SUFFIXES]
    if not bad:
        return
    suffix = _suffix(bad[0])
    tool, target = COMPRESSED_SUFFIXES[suffix]
    folder = storage.parent(bad[0])
    shown = ", ".join(repr(b) for b in bad[:3]) + (" ..." if len(bad) > 3 else "")
    raise CompressedShardsError(
        f"{len(bad)} of the {len(shards)} shards are compressed tars ({shown}). A sample is read by its "
        f"byte offset in the tar, which a compressed file does not have, so these cannot be read with exact resume. "
        f"Decompress them once (the originals stay), e.g.  for f in {folder}/*{suffix}; do {tool} -dc \"$f\" > "
        f"{target}; done  then point at the .tar files")


def expand_spec(spec: str) -> list[str]:
    """The shard files ``spec`` names (see the module doc for the syntax): sorted within each comma-separated part,
    parts in order, each shard once.

    Raises :class:`NoShardsError` (also a ``FileNotFoundError``) naming what a part looked for when it matches
    nothing, :class:`CompressedShardsError` for compressed tars, :class:`ShardSpecError` for a spec that cannot be
    expanded.
    """
    parts = split_parts(str(spec))
    if not parts:
        raise NoShardsError("no shards given (an empty spec): set data.train_shards or [[data.sources]]")
    out: list[str] = []
    seen: set[str] = set()
    twice = 0
    for part in parts:
        for s in _expand_part(part):
            if s in seen:
                twice += 1
                continue
            seen.add(s)
            out.append(s)
    if twice:
        log.warning("%r names %d shard(s) more than once; each is read once", spec, twice)
    _refuse_compressed(out)
    return out
