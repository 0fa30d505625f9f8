"""From the label file's image names to files on disk, and which of those files a model can use.

A row resolves to exactly one existing file: `dataset.images / <path as written>`. A path that
leaves `dataset.images` (absolute, or `..` above it) is refused unless
`dataset.allow_outside_paths: true`. Only for NIH (whose PNGs ship in images_001/images/ ...
images_012/images/) is a name not found there looked up by file name below the images folder, and
only when that name is unique; a name found twice stops the run with the candidates listed. A name
that matches a file only after Unicode normalisation (NFD on disk, NFC in the CSV) or after
stripping spaces around a name (cells are stripped) resolves to that file when exactly one matches,
with a note. A missing file is reported missing, never replaced; a FIFO, a symlink loop or a
dangling symlink is reported as such. One file is one file whatever its names: rows are compared by
device and inode (hard links, symlinks, `./x`), and with `image_check: decode` by content hash.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import stat
import sys
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm import tqdm

from workflow_scripts.common.images import MIN_SIDE, check_image
from workflow_scripts.common.errors import DataError
from workflow_scripts.common.labels import note

NOT_FOUND = "file not found"


def check_images_root(root: Path) -> None:
    if Path(os.path.realpath(root)) == Path(root.anchor or "/"):
        raise DataError(f"dataset.images: {str(root)!r} is the filesystem root; point it at the folder that holds "
                        "the images (the folder the label file's paths are relative to)")
    if root.is_file():
        raise DataError(f"{root}: is a file, not a folder (dataset.images must be the folder of the images)")
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found (dataset.images)")


def _files_by_name(root: Path) -> dict[str, list[Path]]:
    """Every file below `root` by name. Symlinked folders are followed (NIH's images_001 is often a
    link to another disk), each real folder once: a link back up the tree is no endless walk, and a
    folder reached by two links does not make every file two candidates."""
    by_name: dict[str, list[Path]] = {}
    seen: set[str] = set()
    for folder, folders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            folders.clear()
            continue
        seen.add(real)
        for name in files:
            by_name.setdefault(name, []).append(Path(folder) / name)
    return by_name


def _leaves(image: str) -> bool:
    """True for an absolute path or one whose `..` climbs above dataset.images (judged on the text,
    so a symlinked folder inside dataset.images is still inside)."""
    return os.path.isabs(image) or os.path.normpath(image).split(os.sep)[0] == ".."


def _loose(name: str) -> str:
    return unicodedata.normalize("NFC", name).strip()


def _loose_match(root: Path, image: str, where: str, index: dict[Path, dict[str, list[str]]]) -> Path | None:
    """The one file whose path equals `image` once every part is NFC-normalised and stripped of
    surrounding spaces, or None; two such files raise DataError listing them. `index` caches each
    folder's entries by loose name (a folder of 112k NIH files is listed once, not once a miss)."""
    found = root
    for part in Path(image).parts:
        if (found / part).exists():
            found = found / part
            continue
        if found not in index:
            try:
                entries = os.listdir(found)
            except OSError:
                return None
            index[found] = {}
            for entry in entries:
                index[found].setdefault(_loose(entry), []).append(entry)
        matches = index[found].get(_loose(part), [])
        if len(matches) > 1:
            raise DataError(f"{where}: {len(matches)} entries of {found} match {part!r} once Unicode normalisation "
                            f"and surrounding spaces are ignored ({[str(found / m) for m in matches]}); rename them")
        if not matches:
            return None
        found = found / matches[0]
    return found if found.is_file() else None


def why_unusable(path: Path, image: str) -> str:
    """Why `path` (the row's file) is no file to read: folder, FIFO, symlink loop, dangling link, missing."""
    try:
        link = os.lstat(path)
    except OSError:
        link = None
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        if error.errno == errno.ELOOP:
            return f"{path} is a symbolic link loop (it points back at itself)"
        if error.errno == errno.EACCES:
            return f"{path} cannot be reached: permission denied on a folder of its path"
        if link is not None and stat.S_ISLNK(link.st_mode):
            return f"{path} is a symbolic link to a missing file ({os.readlink(path)})"
        if image.startswith("~"):
            return f"{NOT_FOUND} (the path starts with '~', which is not expanded: write it relative to dataset.images)"
        return NOT_FOUND
    if stat.S_ISDIR(mode):
        return f"{path} is a folder, not an image file"
    kind = "FIFO (named pipe)" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode) else "device"
    return f"{path} is not a regular file (a {kind})"


NAME_MAX, PATH_MAX = 255, 4096  # bytes: Linux's limits (ext4, xfs, btrfs; macOS and Windows allow no more)


def impossible_path(image: str) -> str | None:
    """Why no filesystem accepts `image` as a path (a NUL byte, a name over 255 bytes, a path over
    4096 bytes), or None. Refused by name and line instead of an OSError at the first stat."""
    if "\0" in image:
        return "holds a NUL byte"
    encoded = os.fsencode(image)
    longest = max((len(part) for part in encoded.split(b"/")), default=0)
    if longest > NAME_MAX:
        return f"has a name of {longest} bytes (at most {NAME_MAX})"
    if len(encoded) > PATH_MAX:
        return f"is {len(encoded)} bytes long (at most {PATH_MAX})"
    return None


def resolve_paths(
    frame: pd.DataFrame, root: Path, search_by_name: bool, csv_path: Path, allow_outside: bool = False,
    notes: list[str] | None = None,
) -> tuple[list[Path | None], list[str | None]]:
    """(file or None, reason it is unusable or None) for every row of `frame` (columns row, image).

    `search_by_name` (NIH): a bare name not found directly under `root` is looked up anywhere below
    it; a name found more than once raises DataError listing the candidates."""
    check_images_root(root)
    paths: list[Path | None] = []
    reasons: list[str | None] = []
    by_name: dict[str, list[Path]] | None = None
    loose: list[tuple[int, str, Path]] = []
    index: dict[Path, dict[str, list[str]]] = {}
    for row, image in zip(frame["row"], frame["image"]):
        where = f"{csv_path} line {row}"
        impossible = impossible_path(image)
        if impossible:
            raise DataError(f"{where}: image path {image[:80]!r}{'…' if len(image) > 80 else ''} {impossible}, so no "
                            "filesystem holds such a file; correct the row")
        if not allow_outside and _leaves(image):
            raise DataError(f"{where}: image {image} is outside dataset.images ({root}); rows resolve under it. Write "
                            "the path relative to dataset.images, or set dataset.allow_outside_paths: true")
        direct = root / image
        if direct.is_file():
            paths.append(direct)
            reasons.append(None)
            continue
        if search_by_name and Path(image).name == image and not os.path.lexists(direct):
            by_name = _files_by_name(root) if by_name is None else by_name
            candidates = by_name.get(image, [])
            if len(candidates) > 1:
                listed = ", ".join(str(path) for path in sorted(candidates)[:5])
                raise DataError(
                    f"{where}: image {image} is not directly under {root} and {len(candidates)} "
                    f"files of that name are below it ({listed}); which one the row means is unknown. "
                    "Remove the copies, or point dataset.images at the folder that holds the right one"
                )
            if candidates:
                paths.append(candidates[0])
                reasons.append(None)
                continue
        match = None if os.path.lexists(direct) else _loose_match(root, image, where, index)
        if match is not None:
            loose.append((row, image, match))
        paths.append(match)
        reasons.append(None if match is not None else why_unusable(direct, image))
    if loose:
        row, image, match = loose[0]
        note(f"{csv_path}: {len(loose)} path(s) match their file only after Unicode normalisation (NFC/NFD) or "
             f"ignoring spaces around a name, and resolve to it (first: line {row}, {image!r} -> {str(match)!r})", notes)
    return paths, reasons


def file_identity(path: Path | str) -> tuple[int, int]:
    """(device, inode): the same for every name of one file (hard links, symlinks, ./x, a/../x)."""
    info = os.stat(path)
    return info.st_dev, info.st_ino


def _same_file_error(csv_path: Path, rows: list[tuple[int, str]], what: str) -> DataError:
    lines = [str(row) for row, _ in rows]
    names = [image for _, image in rows]
    join = lambda items: ", ".join(items[:-1]) + " and " + items[-1]  # noqa: E731
    return DataError(f"{csv_path} lines {join(lines)}: {join(names)} are {what}; one film cannot reach two "
                     "patients or two splits. Keep one row per image")


def check_same_files(frame: pd.DataFrame, csv_path: Path) -> None:
    """Refuse rows that are one file (x.png, ./x.png, sub/../x.png, a symlink or a hard link to x.png),
    naming every such row. `frame` has row, image, path (resolved or None)."""
    groups: dict[tuple[int, int], list[tuple[int, str]]] = {}
    for row, image, path in zip(frame["row"], frame["image"], frame["path"]):
        if path is not None:
            groups.setdefault(file_identity(path), []).append((row, image))
    shared = next((rows for rows in groups.values() if len(rows) > 1), None)
    if shared:
        path = frame["path"][frame["row"] == shared[0][0]].iloc[0]
        raise _same_file_error(csv_path, shared, f"the same file ({os.path.realpath(path)}: one device and inode)")


def check_same_content(frame: pd.DataFrame, digests: Sequence[str | None], csv_path: Path) -> None:
    """Refuse byte-identical files under different names (a copy is the same film: in train and test
    it leaks), naming every row with its patient and split. `frame` has row, image, patient, split."""
    groups: dict[str, list[int]] = {}
    for index, digest in enumerate(digests):
        if digest is not None:
            groups.setdefault(digest, []).append(index)
    shared = next((indices for indices in groups.values() if len(indices) > 1), None)
    if shared:
        rows = [(frame["row"].iloc[i], frame["image"].iloc[i]) for i in shared]
        where = ", ".join(f"{frame['image'].iloc[i]}: patient {frame['patient'].iloc[i]}, {frame['split'].iloc[i]}"
                          for i in shared)
        raise _same_file_error(csv_path, sorted(rows), f"byte-identical copies of one file ({where})")


def _problem(path: str, decode: bool, min_side: int) -> tuple[str | None, str | None]:
    # Top level so that worker processes can unpickle it. The content hash rides along with the
    # decode (the file is in the page cache then).
    if not decode:
        return (None if os.path.isfile(path) else NOT_FOUND), None
    reason = check_image(path, min_side=min_side)
    if reason is not None:
        return reason, None
    with open(path, "rb") as handle:
        return None, hashlib.file_digest(handle, "sha256").hexdigest()


def default_workers() -> int:
    """CPU cores this process may use (its affinity mask, not the whole machine's): the one count the
    image checks, the classifier's decoding and Snakemake's job_cores read. Torch-free."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def check_images(
    paths: Sequence[Path], decode: bool, min_side: int = MIN_SIDE, workers: int | None = None
) -> list[tuple[str | None, str | None]]:
    """(reason each image is unusable or None, its sha256 when decoded and usable). With several
    workers, images are decoded in a process pool in chunks (decoding is CPU-bound); the result is
    the same as a serial check."""
    check = functools.partial(_problem, decode=decode, min_side=min_side)
    workers = max(1, workers or default_workers())
    names = [str(path) for path in paths]
    progress = functools.partial(tqdm, total=len(names), desc="checking images", unit="img",
                                 disable=len(names) < 50, file=sys.stderr)
    if len(names) < 2 * workers or not decode:
        workers = 1
    chunksize = max(1, min(64, len(names) // (workers * 4)))
    return list(progress(ordered_map(check, names, workers, chunksize)))


def ordered_map(function: Callable[[Any], Any], items: Sequence[Any], workers: int, chunksize: int = 1) -> Iterator[Any]:
    """function(item) for each item, in order: in a pool of `workers` processes (for CPU-bound work;
    `function` must be picklable), or in this process when `workers` is 1 or less."""
    if workers <= 1:
        yield from map(function, items)
        return
    with ProcessPoolExecutor(workers) as pool:
        yield from pool.map(function, items, chunksize=chunksize)


def find_bad_images(
    paths: Sequence[Path], decode: bool, min_side: int = MIN_SIDE, workers: int | None = None
) -> list[str | None]:
    """The reason each image is unusable, or None (`check_images` without the hashes)."""
    return [reason for reason, _ in check_images(paths, decode, min_side, workers)]
