"""Decode once: every film the classifier reads, decoded and preprocessed a single time.

A cache holds one list of films (a split, or a synthetic pool) at the classifier's input size, as
the uint8 pixels `classifier_model.film_pixels` makes (short side resized, center crop, grayscale):
`<cache_dir>/<name>-<size>px-<interpolation>/<fingerprint>.npy` (N x size x size, memory-mapped
when read) and `<fingerprint>.json` (the paths, in row order). The fingerprint covers the
preprocessing (size, interpolation, CACHE_VERSION) and every source file (path, size in bytes,
modification time), so a changed film, list or setting gets a new cache and a stale one is never
read. The manifest also records a CRC-32 of the pixels as written, in row order: each use checks
the cache's content against it (one read of the file), so a cache cut short, corrupted or with rows
swapped is removed and rebuilt with a note instead of feeding wrong pixels or a traceback. (A CRC,
not a cryptographic hash: it guards against accidents, at twice sha256's speed.) Every arm and seed
of a study reads the same caches; normalization (and any augmentation) runs on the cached tensors,
on the training device.

Concurrency (Snakemake runs several classifier jobs at once): the first job to need a cache builds
it under an exclusive file lock, in a `.partial` file renamed into place when complete; the others
wait on the lock and then read it. A crash leaves no cache that looks complete. Older caches of the
same name are removed when a new one is built (a process still reading one keeps its open file).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import zlib
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from workflow_scripts.classifier.classifier_device import machine_cores
from workflow_scripts.classifier.classifier_model import read_film
from workflow_scripts.common.errors import DataError

CACHE_VERSION = 2  # raise when film_pixels changes what it computes (2: the manifest records the content's CRC)
CHUNK = 256  # films decoded per round of the thread pool (bounds the memory in flight)


def fingerprint(paths: Sequence[str], size: int, interpolation: str) -> str:
    """sha256 of the preprocessing and of each source file's path, byte size and mtime; a missing
    file is a DataError naming it."""
    digest = hashlib.sha256(json.dumps({"version": CACHE_VERSION, "size": int(size),
                                        "interpolation": str(interpolation)}).encode())
    for path in paths:
        try:
            stat = os.stat(path)
        except OSError as error:
            raise DataError(f"{path}: cannot read this image for the classifier cache ({error.strerror})") from None
        digest.update(f"\n{path}\t{stat.st_size}\t{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """An exclusive lock between processes (fcntl; without it, e.g. on Windows, no lock)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another job to finish {lock_path.parent}", file=sys.stderr, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _decode_into(target: np.ndarray, paths: Sequence[str], size: int, interpolation: str, threads: int,
                 desc: str, show_progress: bool) -> None:
    # PIL releases the GIL while it decodes and resizes, so threads scale without extra processes.
    with ThreadPoolExecutor(max_workers=threads) as pool, \
            tqdm(total=len(paths), desc=desc, unit="film", disable=not show_progress, file=sys.stderr) as progress:
        for start in range(0, len(paths), CHUNK):
            chunk = paths[start:start + CHUNK]
            for offset, film in enumerate(pool.map(lambda path: read_film(path, size, interpolation), chunk)):
                target[start + offset] = film
            progress.update(len(chunk))


def cache_films(paths: Sequence[str], cache_dir: str | Path, name: str, size: int, interpolation: str = "bicubic",
                threads: int | None = None, show_progress: bool = True) -> np.ndarray:
    """The films at `paths` as a read-only memory-mapped uint8 array (len(paths), size, size), row i
    from paths[i]; decoded now (under the lock) unless an up-to-date cache exists."""
    paths = [str(path) for path in paths]
    key = fingerprint(paths, size, interpolation)
    folder = Path(cache_dir) / f"{name}-{int(size)}px-{interpolation}"
    images = folder / f"{key[:24]}.npy"
    folder.mkdir(parents=True, exist_ok=True)
    # Opened under the lock too: a job building another version of this cache removes stale files.
    with _locked(folder / ".lock"):
        films = _open_checked(images, paths, size) if images.is_file() else None
        if films is None:  # built by no job yet (or while this one waited), or found damaged
            _build(images, paths, size, interpolation, threads or machine_cores(), name, show_progress)
            films = np.load(images, mmap_mode="r")
    return films


def content_crc(films: np.ndarray) -> str:
    """CRC-32 of the shape and the cached pixels in row order (read in chunks: the array may be memory-mapped)."""
    crc = zlib.crc32(repr(films.shape).encode())
    for start in range(0, len(films), CHUNK):
        crc = zlib.crc32(np.ascontiguousarray(films[start:start + CHUNK]).data, crc)
    return f"{crc:08x}"


def _open_checked(images: Path, paths: list[str], size: int) -> np.ndarray | None:
    """The cache when its shape, paths and content are those its manifest records; else None, after a
    note and the removal of the damaged files (the caller rebuilds it)."""
    manifest = images.with_suffix(".json")
    try:
        films = np.load(images, mmap_mode="r")
        recorded = json.loads(manifest.read_text())
        if films.shape != (len(paths), size, size) or films.dtype != np.uint8:
            problem = f"shape {films.shape} {films.dtype}, expected {(len(paths), size, size)} uint8"
        elif not isinstance(recorded, dict) or recorded.get("paths") != paths:
            problem = f"its list of films ({manifest.name}) is not the one asked for"
        elif recorded.get("crc32") != content_crc(films):
            problem = "its pixels are not those written (cut, corrupted or rows moved)"
        else:
            return films
    except (OSError, ValueError) as error:  # cut short: "mmap length is greater than file size", bad JSON
        problem = f"unreadable ({str(error).splitlines()[0][:200]})"
    print(f"classifier cache {images}: {problem}; rebuilding it", file=sys.stderr, flush=True)
    images.unlink(missing_ok=True)
    manifest.unlink(missing_ok=True)
    return None


def _build(images: Path, paths: list[str], size: int, interpolation: str, threads: int, name: str,
           show_progress: bool) -> None:
    partial = images.with_name(images.name + ".partial")
    try:
        target = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=(len(paths), size, size))
        _decode_into(target, paths, size, interpolation, threads, f"decode once: {name}", show_progress)
        target.flush()
        digest = content_crc(target)
        del target
        manifest = images.with_suffix(".json")
        manifest.write_text(json.dumps({"version": CACHE_VERSION, "size": size, "interpolation": interpolation,
                                        "crc32": digest, "paths": paths}) + "\n")
        os.replace(partial, images)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    for old in images.parent.glob("*.npy"):  # stale caches of this name: superseded
        if old != images:
            old.unlink(missing_ok=True)
            old.with_suffix(".json").unlink(missing_ok=True)


class FilmStore:
    """Rows of several caches read as one: `gather(rows)` -> uint8 tensor (len(rows), size, size).
    `sources` maps a cache's name to its (paths, films); the store's rows are `paths` of any source."""

    def __init__(self, sources: Mapping[str, tuple[Sequence[str], np.ndarray]]) -> None:
        self.arrays = [films for _, films in sources.values()]
        self.where: dict[str, tuple[int, int]] = {}
        for number, (paths, _) in enumerate(sources.values()):
            for row, path in enumerate(paths):
                self.where.setdefault(str(path), (number, row))

    def locate(self, paths: Sequence[str]) -> np.ndarray:
        """(len(paths), 2) array of (cache, row) for each path; a path in no cache is a DataError."""
        missing = [path for path in paths if str(path) not in self.where]
        if missing:
            raise DataError(f"{len(missing)} image(s) are in no classifier cache, e.g. {missing[0]}")
        return np.array([self.where[str(path)] for path in paths], dtype=np.int64).reshape(-1, 2)

    def gather(self, located: np.ndarray) -> torch.Tensor:
        size = self.arrays[0].shape[1:] if self.arrays else (0, 0)
        out = np.empty((len(located), *size), dtype=np.uint8)
        for i, (number, row) in enumerate(located):
            out[i] = self.arrays[number][row]
        return torch.from_numpy(out)


class CachedBatches:
    """The batches of a training schedule (or of an evaluation pass) read from a FilmStore:
    (uint8 films, targets) per batch, pinned for an asynchronous copy when CUDA is in use.
    Iterable like a DataLoader, in the main process: a batch is a copy from memory, no decoding."""

    def __init__(self, store: FilmStore, paths: Sequence[str], targets: np.ndarray,
                 batches: Sequence[Sequence[int]]) -> None:
        self.store, self.located, self.targets = store, store.locate(paths), targets
        self.batches = [list(batch) for batch in batches]
        self.pin = torch.cuda.is_available()

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in self.batches:
            films, targets = self.store.gather(self.located[batch]), torch.from_numpy(self.targets[batch])
            yield (films.pin_memory(), targets.pin_memory()) if self.pin else (films, targets)


def sequential(n: int, batch_size: int) -> list[list[int]]:
    """Rows 0..n-1 in order, in batches of `batch_size` (the last one shorter): an evaluation pass."""
    return [list(range(start, min(n, start + batch_size))) for start in range(0, n, batch_size)]


def decoded_batches(paths: Sequence[str], targets: np.ndarray, batches: Sequence[Sequence[int]], size: int,
                    interpolation: str, workers: int) -> torch.utils.data.DataLoader:
    """The same batches as CachedBatches, decoded from the files at every access (no cache): the
    path the cache replaces, kept for `--no-cache` and the benchmark. Workers are not persistent."""
    from workflow_scripts.classifier.classifier_model import FilmDataset, _seed_worker

    return torch.utils.data.DataLoader(FilmDataset(paths, targets, size, interpolation), batch_sampler=batches,
                                       num_workers=workers, worker_init_fn=_seed_worker,
                                       pin_memory=torch.cuda.is_available())


def source_name(csv: str | Path) -> str:
    """A pool's cache name: the folder of its list (results/synthetic_noise/generation_results.csv ->
    synthetic_noise)."""
    name = Path(csv).resolve().parent.name
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name) or "pool"


def study_store(sources: Mapping[str, Sequence[str]], needed: Sequence[str], cache_dir: str | Path, size: int,
                interpolation: str, show_progress: bool = True) -> FilmStore:
    """A FilmStore over the named sources (e.g. train, val, test, synthetic: each cached whole, so
    every arm and seed reads the same cache), plus one cache for any `needed` path that is in none
    of them (named by a hash of its list)."""
    cached = {name: ([str(p) for p in paths], None) for name, paths in sources.items() if len(paths)}
    known = {path for paths, _ in cached.values() for path in paths}
    extra = sorted({str(path) for path in needed} - known)
    if extra:
        cached["extra-" + hashlib.sha256("\n".join(extra).encode()).hexdigest()[:12]] = (extra, None)
    return FilmStore({name: (paths, cache_films(paths, cache_dir, name, size, interpolation, show_progress=show_progress))
                      for name, (paths, _) in cached.items()})
