import gzip
import os

import nibabel as nib
import numpy as np
import pytest
from skimage.transform import resize

import dataset
from conftest import make_study, write_slice
from utils import DataError, read_nifti


def test_loader_reads_every_kind(study):
    splits = dataset.find_splits(study)
    assert [len(splits[s]) for s in dataset.SPLITS] == [12, 3, 3]
    files = splits["train"]
    assert any(f.endswith(".nii") for f in files) and any(f.endswith(".nii.gz") for f in files)
    kinds = {(nib.load(f).shape, nib.load(f).get_data_dtype().name) for f in files}
    assert {(256, 144), (256, 128, 1)} <= {k[0] for k in kinds} and {"int16", "float32"} <= {k[1] for k in kinds}
    p = dataset.prepare(files)
    assert p["x"].shape == (12, 256, 128) and p["x"].dtype == np.float32
    assert np.allclose(p["x"].min(axis=(1, 2)), 0) and np.allclose(p["x"].max(axis=(1, 2)), 1)


def test_resize_is_scikit_image_anti_aliased(tmp_path):
    a = np.random.default_rng(0).random((256, 144)).astype(np.float32) * 100
    write_slice(tmp_path / "case_001_week_0_slice_0.nii.gz", a)
    x, lo, hi, _ = dataset.load_slice(str(tmp_path / "case_001_week_0_slice_0.nii.gz"))
    expect = resize(a.astype(np.float64), (256, 128), anti_aliasing=True, preserve_range=True)
    assert x.shape == (256, 128) and (lo, hi) == (expect.min(), expect.max())
    assert np.allclose(x, (expect - lo) / (hi - lo), atol=1e-6)


def test_normalisation_round_trip(study):
    f = dataset.find_splits(study)["train"][0]
    x, lo, hi, _ = dataset.load_slice(f)
    raw = read_nifti(f)
    assert np.allclose(dataset.denormalise(x.astype(np.float64), lo, hi), raw, rtol=1e-5, atol=1e-3 * (hi - lo))


def test_patient_disjoint_split_when_no_validate_folder(tmp_path):
    root = make_study(tmp_path / "d", cases={"train": list(range(4, 14)), "test": [40]}, per_case=2)
    splits = dataset.find_splits(root, val_fraction=0.2, seed=3)
    tr = {dataset.case_id(f) for f in splits["train"]}
    va = {dataset.case_id(f) for f in splits["validate"]}
    assert len(va) == 2 and not tr & va and len(tr | va) == 10
    assert splits == dataset.find_splits(root, val_fraction=0.2, seed=3)  # deterministic


def test_per_split_folders(study):
    s = dataset.find_splits(None, train_dir=os.path.join(study, "keras_slices_train"),
                            test_dir=os.path.join(study, "keras_slices_test"))
    assert len(s["test"]) == 3 and len(s["train"]) + len(s["validate"]) == 12


def test_cache_is_used_and_rebuilt_on_change(study, tmp_path):
    files = dataset.find_splits(study)["train"]
    cache = str(tmp_path / "cache")
    a = dataset.prepare(files, cache)
    assert len([f for f in os.listdir(cache) if f.endswith(".json")]) == 1
    b = dataset.prepare(files, cache)
    assert np.array_equal(a["x"], b["x"])
    write_slice(files[0], np.arange(256 * 128, dtype=np.float32).reshape(256, 128))
    c = dataset.prepare(files, cache)
    assert len([f for f in os.listdir(cache) if f.endswith(".json")]) == 2
    assert not np.array_equal(a["x"][0], c["x"][0]) and np.array_equal(a["x"][1:], c["x"][1:])


def bad_files(tmp_path):
    ok = np.random.default_rng(0).random((256, 128)).astype(np.float32)
    (tmp_path / "case_001_week_0_slice_0.nii.gz").write_bytes(b"this is not nifti")
    good = tmp_path / "good.nii"
    write_slice(good, ok)
    (tmp_path / "case_001_week_0_slice_1.nii.gz").write_bytes(gzip.compress(good.read_bytes())[:2000])
    write_slice(tmp_path / "case_001_week_0_slice_2.nii.gz", np.random.rand(256, 128, 3).astype(np.float32))
    nan = ok.copy()
    nan[3, 3] = np.nan
    write_slice(tmp_path / "case_001_week_0_slice_3.nii.gz", nan)
    inf = ok.copy()
    inf[0, 0] = np.inf
    write_slice(tmp_path / "case_001_week_0_slice_5.nii.gz", inf)
    return {"slice_0": "not a readable NIfTI", "slice_1": "corrupt gzip", "slice_2": "got shape (256, 128, 3)",
            "slice_3": "NaN or Inf", "slice_5": "NaN or Inf"}


def test_each_bad_input_names_file_and_problem(tmp_path):
    for stem, problem in bad_files(tmp_path).items():
        path = str(tmp_path / f"case_001_week_0_{stem}.nii.gz")
        with pytest.raises(DataError) as e:
            read_nifti(path)
        msg = str(e.value)
        assert "\n" not in msg and path in msg and problem in msg, msg


def test_prepare_refuses_or_skips_bad_files(tmp_path):
    expected = bad_files(tmp_path)
    files = dataset.list_slices(str(tmp_path))
    with pytest.raises(DataError) as e:
        dataset.prepare(files)
    assert len(str(e.value).splitlines()) == len(expected)
    p = dataset.prepare(files, skip_bad=True)
    assert p["files"] == [str(tmp_path / "good.nii")] and len(p["skipped"]) == len(p["bad"]) == len(expected)


def test_constant_slices_are_skipped_and_listed(tmp_path, study):
    files = dataset.find_splits(study)["train"]
    const = os.path.join(study, "keras_slices_train", "case_004_week_0_slice_7.nii.gz")
    write_slice(const, np.zeros((256, 128), np.int16))
    p = dataset.prepare(files + [const], str(tmp_path / "cache"))  # strict: constant slices are not bad input
    assert p["files"] == files and p["bad"] == []
    assert p["skipped"] == [f"{const}: constant slice (every value is 0), skipped"]
    assert dataset.prepare(files + [const], str(tmp_path / "cache"))["skipped"] == p["skipped"]  # from the cache


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(DataError, match="folder not found"):
        dataset.find_splits(str(tmp_path / "nowhere"))
    (tmp_path / "keras_slices_train").mkdir()
    with pytest.raises(DataError, match="no .nii or .nii.gz files"):
        dataset.find_splits(str(tmp_path))


def test_batches_shard_disjoint_and_equal():
    world = [dataset.batches(103, 8, seed=1, epoch=2, rank=r, world=3) for r in range(3)]
    flat = [np.concatenate(b) for b in world]
    assert len({len(b) for b in world}) == 1 and len({len(f) for f in flat}) == 1
    assert len(set(np.concatenate(flat))) == sum(len(f) for f in flat)
    full = np.concatenate([np.concatenate(b) for b in
                           (dataset.batches(103, 8, 1, 0, r, 3, shuffle=False) for r in range(3))])
    assert sorted(full) == list(range(103))  # validation covers the whole split once


def test_phantom_is_deterministic_and_varied():
    from phantom import phantom_slice
    a, b = phantom_slice(5, 0, 3, 20), phantom_slice(5, 0, 3, 20)
    assert np.array_equal(a, b) and a.shape == (256, 128)
    near, other = phantom_slice(5, 0, 4, 20), phantom_slice(9, 0, 3, 20)
    assert np.abs(a - near).mean() < np.abs(a - other).mean()


def test_grid_plot(tmp_path, study):
    from figures import plot_grid
    p = dataset.prepare(dataset.find_splits(study)["test"])
    plot_grid(p["x"], tmp_path / "s.png", titles=["a", "b", "c"])
    assert (tmp_path / "s.png").stat().st_size > 1000


def test_parallel_loading_gives_what_one_process_does(study):
    files = dataset.find_splits(study)["train"]
    one, two = dataset.prepare(files, workers=1), dataset.prepare(files, workers=2)
    assert (one["x"] == two["x"]).all() and one["files"] == two["files"] and (one["lo"] == two["lo"]).all()


def test_cache_whose_arrays_do_not_fit_its_file_list_is_rebuilt(study, tmp_path, capsys):
    files = dataset.find_splits(study)["train"]
    cache = tmp_path / "cache"
    a = dataset.prepare(files, str(cache))
    np.save(next(p for p in cache.glob("*.npy") if ".masks" not in p.name), a["x"][:-1])  # one slice short
    b = dataset.prepare(files, str(cache))
    assert "unreadable (ValueError" in capsys.readouterr().out and (a["x"] == b["x"]).all()
