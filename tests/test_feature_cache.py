"""The on-disk feature cache is keyed by what the features were computed from, and must be a folder."""

import os

import pytest

from conftest import image_folder_config, make_image_folder
from study.evaluation import run as evaluation_run
from study.evaluation.features import FeatureCache
from study.train.loop import pretrain
from study.utils.errors import UserError


@pytest.fixture
def extractions(monkeypatch):
    """The feature matrices actually computed (not served from the cache)."""
    calls = []
    real = evaluation_run.extract_features

    def counting(*args, **kwargs):
        calls.append(kwargs.get("desc"))
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation_run, "extract_features", counting)
    return calls


def test_an_image_folder_changed_in_place_is_not_served_stale_features(tmp_path, extractions):
    images = make_image_folder(tmp_path / "images", classes=2, per_class=6)
    pretrain(image_folder_config(images, "epochs=1", "data.num_workers=0"), tmp_path / "run", progress=False)
    cache = tmp_path / "cache"

    def evaluate():
        evaluation_run.evaluate(tmp_path / "run", "knn", None, feature_cache=cache, knn_k=3, random_baseline=False,
                                progress=False, verbose=False)

    evaluate()
    assert len(extractions) == 2  # train and val
    evaluate()
    assert len(extractions) == 2  # the same checkpoint, images and settings: both from the cache
    # one image replaced by another under the same name (a re-exported dataset, a fixed label folder)
    first = sorted((images / "n00000000").iterdir())[0]
    first.write_bytes(sorted((images / "n00000001").iterdir())[0].read_bytes())
    stat = first.stat()
    os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    evaluate()
    assert len(extractions) == 3  # the split holding that image again, the other split from the cache
    assert len(list(cache.glob("features_*.pt"))) == 3


def test_a_feature_cache_that_is_a_file_is_refused_before_any_feature(tmp_path, extractions):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    for path in (notes, notes / "cache"):
        with pytest.raises(UserError, match=f"--feature-cache {path}"):
            FeatureCache(path)
    images = make_image_folder(tmp_path / "images", classes=2, per_class=6)
    pretrain(image_folder_config(images, "epochs=1", "data.num_workers=0"), tmp_path / "run", progress=False)
    with pytest.raises(UserError, match="is a file"):
        evaluation_run.evaluate(tmp_path / "run", "knn", None, feature_cache=notes, knn_k=3, progress=False,
                                verbose=False)
    assert extractions == [] and notes.read_text() == "mine\n"
