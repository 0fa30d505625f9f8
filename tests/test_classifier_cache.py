"""The classifier's decode-once cache and its device choices (CPU-testable parts of the CUDA path)."""

from __future__ import annotations

import os
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from workflow_scripts.classifier import classifier_cache, train_classifier
from workflow_scripts.classifier.classifier_cache import (CachedBatches, FilmStore, cache_films, decoded_batches,
                                                          sequential, study_store)
from workflow_scripts.classifier.classifier_device import Precision, amp_dtype, loader_workers, precision_for
from workflow_scripts.classifier.classifier_model import FilmDataset, normalize, read_film
from workflow_scripts.common.errors import DataError

SHARED_FILMS = Path(__file__).resolve().parents[2] / "shared" / "data" / "cxr-dev" / "images"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture
def films(tmp_path: Path) -> list[str]:
    """Real NIH films (copied; one made non-square and one 16-bit) or, without them, noise PNGs."""
    folder = tmp_path / "films"
    folder.mkdir()
    sources = sorted(SHARED_FILMS.glob("*.png"))[:6] if SHARED_FILMS.is_dir() else []
    paths = []
    for i in range(6):
        path = folder / f"film_{i}.png"
        if sources:
            shutil.copy(sources[i], path)
        else:
            Image.fromarray(np.random.default_rng(i).integers(0, 256, (70, 70), dtype=np.uint8)).save(path)
        paths.append(str(path))
    image = Image.open(paths[0]).convert("L")
    image.resize((image.width, image.height * 3 // 2)).save(paths[0])  # portrait: resize + crop
    pixels = np.asarray(Image.open(paths[1]).convert("L"), dtype=np.uint16) * 257
    Image.fromarray(pixels).save(paths[1])  # 16-bit PNG
    return paths


def test_cached_films_equal_decoded_ones_and_feed_the_model_identically(films: list[str], tmp_path: Path) -> None:
    cached = cache_films(films, tmp_path / "cache", "train", 48, "bicubic", threads=2, show_progress=False)
    assert isinstance(cached, np.memmap) and cached.dtype == np.uint8 and cached.shape == (6, 48, 48)
    assert np.array_equal(cached, np.stack([read_film(path, 48, "bicubic") for path in films]))
    # What the model sees: bit for bit the old per-image preprocessing (decode, resize, normalize).
    targets = np.eye(6, 3, dtype=np.float32)
    batches = [[3, 0, 5], [1, 1]]
    store = FilmStore({"train": (films, cached)})
    precision = precision_for(torch.device("cpu"))
    reference = FilmDataset(films, targets, 48, "bicubic")
    for (films_u8, target), batch in zip(CachedBatches(store, films, targets, batches), batches, strict=True):
        expected = torch.stack([normalize(reference[i][0], MEAN, STD) for i in batch])
        assert torch.equal(precision.model_input(films_u8, MEAN, STD), expected)
        assert torch.equal(target, torch.from_numpy(targets[batch]))
    decoded = list(decoded_batches(films, targets, batches, 48, "bicubic", workers=0))
    for (a, _), (b, _) in zip(CachedBatches(store, films, targets, batches), decoded, strict=True):
        assert torch.equal(a, b)


def test_a_cache_is_reused_and_rebuilt_when_a_film_or_setting_changes(films: list[str], tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    first = np.array(cache_films(films, cache, "val", 32, show_progress=False))
    builds = []
    real_build = classifier_cache._build
    monkeypatch.setattr(classifier_cache, "_build", lambda *args: builds.append(args[0]) or real_build(*args))
    assert np.array_equal(cache_films(films, cache, "val", 32, show_progress=False), first) and builds == []
    Image.fromarray(np.full((40, 40), 7, dtype=np.uint8)).save(films[2])  # the film changes on disk
    os.utime(films[2], ns=(1, 1))
    changed = cache_films(films, cache, "val", 32, show_progress=False)
    assert len(builds) == 1 and (changed[2] == 7).all() and np.array_equal(changed[3], first[3])
    assert [p.name for p in (cache / "val-32px-bicubic").glob("*.npy")] == [builds[0].name]  # stale one removed
    cache_films(films, cache, "val", 24, show_progress=False)  # another size: its own cache
    assert len(builds) == 2 and (cache / "val-24px-bicubic").is_dir()


def test_concurrent_first_use_builds_once(films: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # flock locks are per open file, so threads contend like Snakemake's parallel jobs do.
    builds = []
    real_build = classifier_cache._build
    monkeypatch.setattr(classifier_cache, "_build", lambda *args: builds.append(1) or real_build(*args))
    results: list[np.ndarray] = []
    workers = [threading.Thread(target=lambda: results.append(
        np.array(cache_films(films, tmp_path / "cache", "test", 32, show_progress=False)))) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert len(builds) == 1 and len(results) == 4 and all(np.array_equal(r, results[0]) for r in results)


def test_a_bad_film_names_itself_and_leaves_no_cache(films: list[str], tmp_path: Path) -> None:
    Path(films[4]).write_bytes(b"not a png at all")
    with pytest.raises(DataError, match="film_4.png"):
        cache_films(films, tmp_path / "cache", "train", 32, show_progress=False)
    assert not [p.name for p in (tmp_path / "cache" / "train-32px-bicubic").iterdir() if p.name != ".lock"]
    with pytest.raises(DataError, match="missing.png"):
        cache_films([*films[:2], str(tmp_path / "missing.png")], tmp_path / "cache", "train", 32, show_progress=False)


def test_study_store_caches_each_source_whole_and_the_rest_once(films: list[str], tmp_path: Path) -> None:
    store = study_store({"train": films[:3], "synthetic": films[3:5], "val": []}, [films[0], films[4], films[5]],
                        tmp_path / "cache", 32, "bicubic", show_progress=False)
    names = sorted(folder.name.split("-")[0] for folder in (tmp_path / "cache").iterdir())
    assert names == ["extra", "synthetic", "train"]  # films[5] is in no source: a cache of its own
    located = store.locate([films[5], films[0]])
    assert np.array_equal(store.gather(located).numpy(), np.stack([read_film(films[i], 32) for i in (5, 0)]))
    with pytest.raises(DataError, match="in no classifier cache"):
        store.locate([str(tmp_path / "other.png")])
    assert sequential(5, 2) == [[0, 1], [2, 3], [4]]


# ----------------------------------------------------------------------------- device choices


def test_precision_and_worker_choices() -> None:
    assert amp_dtype("cuda", bf16_supported=True) == torch.bfloat16
    assert amp_dtype("cuda", bf16_supported=False) == torch.float16
    assert amp_dtype("cpu", bf16_supported=True) is None
    assert loader_workers(8, cores=2) == 2 and loader_workers(0, cores=16) == 0 and loader_workers(3, cores=16) == 3
    fp16 = Precision(torch.device("cuda"), torch.float16, channels_last=True)
    assert fp16.needs_scaler and not Precision(torch.device("cuda"), torch.bfloat16, True).needs_scaler
    # metrics.json's precision, named through hardware.DTYPE_NAMES
    assert fp16.describe() == "fp16 (GradScaler) autocast, channels-last"
    assert Precision(torch.device("cuda"), torch.bfloat16, False).describe() == "bf16 autocast"
    cpu = precision_for(torch.device("cpu"))
    assert cpu.dtype is None and cpu.channels_last and not cpu.scaler().is_enabled() and cpu.describe() == "fp32, channels-last"


def _tiny_fit(steps: int, points: list[int], targets: float = 1.0) -> tuple[list[dict], int]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4, 2))
    gen = torch.Generator().manual_seed(0)
    batch = lambda: (torch.randint(0, 256, (2, 8, 8), dtype=torch.uint8, generator=gen),  # noqa: E731
                     torch.full((2, 2), targets))
    train = [batch() for _ in range(steps)]
    val = [(torch.randint(0, 256, (4, 8, 8), dtype=torch.uint8, generator=gen), torch.tensor([[0., 1.], [1., 0.]] * 2))]
    log, state, best = train_classifier._fit(model, train, val, val[0][1].numpy(), points,
                                             {"learning_rate": 1e-2, "weight_decay": 0.0},
                                             precision_for(torch.device("cpu")), {"mean": MEAN, "std": STD}, "t", False)
    return log, best


def test_training_loop_reads_device_values_only_at_validation_points(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every read of a tensor's value made by train_classifier's own code (a host sync on a GPU) is counted.
    reads: list[str] = []
    here = train_classifier.__file__
    for name in ("item", "__float__", "__bool__", "__int__", "tolist", "numpy", "cpu"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            if sys._getframe(1).f_code.co_filename == here:
                reads.append(_name)
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    log, _ = _tiny_fit(steps=3, points=[3])
    short = len(reads)
    reads.clear()
    log, best = _tiny_fit(steps=12, points=[12])
    assert short > 0 and len(reads) == short  # the same reads for 4x the steps: none per step
    assert [row["step"] for row in log] == [12] and best == 12 and np.isfinite(log[0]["train_loss"])


def test_a_non_finite_loss_stops_training_at_the_next_validation_point() -> None:
    with pytest.raises(train_classifier.TrainingError, match="between steps 1 and 4"):
        _tiny_fit(steps=6, points=[4, 6], targets=float("nan"))


# ----------------------------------------------------------------------------- damaged caches (issue #26)


def _cache_file(tmp_path: Path) -> Path:
    (npy,) = (tmp_path / "cache" / "test-32px-bicubic").glob("*.npy")
    return npy


def _damage_swap_rows(npy: Path) -> None:
    films = np.load(npy, mmap_mode="r+")
    first = np.array(films[0])
    films[0], films[1] = films[1], first
    films.flush()


def _damage_cut(npy: Path) -> None:
    data = npy.read_bytes()
    npy.write_bytes(data[: len(data) // 2])


def _damage_manifest(npy: Path) -> None:
    manifest = npy.with_suffix(".json")
    manifest.write_text(manifest.read_text()[:20])


@pytest.mark.parametrize("damage", [_damage_swap_rows, _damage_cut, _damage_manifest],
                         ids=["swapped rows of the classifier cache", "a cut classifier cache", "a cut manifest"])
def test_swapped_rows_or_a_cut_classifier_cache_are_rebuilt_with_a_note(films: list[str], tmp_path: Path, damage,
                                                                       capsys: pytest.CaptureFixture) -> None:
    sources = {path: Path(path).read_bytes() for path in films}
    expected = np.stack([read_film(path, 32) for path in films])
    assert np.array_equal(cache_films(films, tmp_path / "cache", "test", 32, show_progress=False), expected)
    damage(_cache_file(tmp_path))
    capsys.readouterr()
    again = cache_films(films, tmp_path / "cache", "test", 32, show_progress=False)
    assert np.array_equal(again, expected)  # each test film scored with its own pixels
    assert "; rebuilding it" in capsys.readouterr().err
    assert {path: Path(path).read_bytes() for path in films} == sources  # no film touched
