"""The prior: reading order and its neighbours, causality, cached sampling against teacher forcing, learning a toy
distribution, checkpoints, and the prior stage and sample.py end to end."""
import json
import math
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch

import prior as prior_module
from metrics import entropy
from prior import CodePrior, centre_out

N_CODES = 8
GRID = (8, 4)  # 4 x 2 patches of 2 x 2 codes


def tiny_prior(seed=0, double=False, **kw):
    torch.manual_seed(seed)
    model = CodePrior(N_CODES, grid=GRID, d_model=32, n_layers=2, n_heads=2, **kw)
    return model.double() if double else model


def counting_grids(n, gen):
    """Grids whose codes count up by one (mod 8) along the flattened grid from a random first code: the unigram is
    uniform (3 bits) but only the first code carries information."""
    first = torch.randint(0, N_CODES, (n, 1), generator=gen)
    return ((first + torch.arange(GRID[0] * GRID[1])) % N_CODES).reshape(n, *GRID)


def test_learns_structured_codes():
    gen = torch.Generator().manual_seed(1)
    model = tiny_prior()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = model(counting_grids(32, gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
    test_codes = counting_grids(256, gen)
    with torch.no_grad():
        bits = model.eval()(test_codes).item() / math.log(2)
    base = entropy(torch.bincount(test_codes.flatten(), minlength=N_CODES)) / math.log(2)
    assert base == pytest.approx(3.0, abs=0.05) and bits < 0.5 * base, (bits, base)


@pytest.mark.parametrize("h", range(1, 10))
def test_centre_out_is_a_permutation_read_from_the_middle(h):
    rows = centre_out(h)
    assert sorted(rows) == list(range(h))
    rank = {r: i for i, r in enumerate(rows)}
    for r in rows:
        assert abs(rank[r] - rank[h - 1 - r]) <= 1  # the mirror partner is read just before or after
        if r != rows[0]:  # the inward neighbour is already read
            assert min(rank.get(r - 1, h), rank.get(r + 1, h)) < rank[r]
    assert centre_out(32)[:6] == [15, 16, 14, 17, 13, 18] and centre_out(32)[-2:] == [0, 31]


def test_tokens_are_patches_in_reading_order():
    model = tiny_prior()
    codes = torch.arange(32).reshape(1, *GRID)  # code = its row-major place in the 8x4 grid
    tokens = model.to_tokens(codes)
    assert tokens.shape == (1, 8, 4) and torch.equal(model.to_grid(tokens), codes)
    # patch rows are read 1, 2, 0, 3 (centre-out over 4), each row's two patches left to right; a patch's codes
    # are its 2x2 block, row by row
    assert tokens[0, 0].tolist() == [8, 9, 12, 13] and tokens[0, 1].tolist() == [10, 11, 14, 15]
    assert tokens[0, 2].tolist() == [16, 17, 20, 21] and tokens[0, 4].tolist() == [0, 1, 4, 5]


def test_neighbours_are_the_inward_and_the_mirrored_patch_read_before():
    model = tiny_prior()
    t = model.n_tokens  # "none"
    # reading order: (row 1: positions 0, 1), (row 2: 2, 3), (row 0: 4, 5), (row 3: 6, 7)
    assert model.neighbours.tolist() == [[t, t], [t, t],    # row 1: the first row read; its mirror, row 2, later
                                         [0, 0], [1, 1],    # row 2: inward row 1, mirrored row 1
                                         [0, t], [1, t],    # row 0: inward row 1; mirror row 3 later
                                         [2, 4], [3, 5]]    # row 3: inward row 2, mirrored row 0
    assert bool((model.neighbours < torch.arange(t)[:, None]).logical_or(model.neighbours == t).all())


def test_forward_is_causal_code_by_code():
    model = tiny_prior(seed=6, double=True).eval()
    codes = torch.randint(0, N_CODES, (2, *GRID), generator=torch.Generator().manual_seed(0))
    base = model.logits(codes)
    for t, j in ((0, 0), (3, 2), (7, 3)):
        tokens = model.to_tokens(codes)
        tokens[:, t, j] = (tokens[:, t, j] + 1) % N_CODES
        out = model.logits(model.to_grid(tokens))
        # code (t, j) is predicted from what is read before it: its own and earlier predictions are unchanged
        assert torch.equal(out[:, :t], base[:, :t]) and torch.equal(out[:, t, :j + 1], base[:, t, :j + 1])
        later = torch.cat([out[:, t, j + 1:].flatten(), out[:, t + 1:].flatten()])
        assert later.numel() == 0 or not torch.allclose(later, torch.cat([base[:, t, j + 1:].flatten(),
                                                                         base[:, t + 1:].flatten()]))


@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.8, 3)])
def test_cached_sampling_draws_from_the_teacher_forced_distribution(temperature, top_k, monkeypatch):
    # the logits each code is drawn from, one cached pass per patch, equal the full teacher-forced pass over the
    # drawn grid: the cache, the neighbour inputs and the patch head agree with training
    model = tiny_prior(seed=3, double=True).eval()
    seen = []
    real_draw = prior_module.draw_code
    monkeypatch.setattr(prior_module, "draw_code", lambda logits, *a, **kw: seen.append(logits) or real_draw(logits, *a,
                                                                                                        **kw))
    grids = model.sample(5, temperature=temperature, top_k=top_k, generator=torch.Generator().manual_seed(7))
    full = model.logits(grids)  # (5, T, 4, n_codes)
    assert len(seen) == model.n_tokens * 4
    assert torch.allclose(torch.stack(seen).view(model.n_tokens, 4, 5, N_CODES).permute(2, 0, 1, 3), full.float(),
                          atol=1e-6)


def test_greedy_samples_are_their_own_argmax_in_spatial_layout():
    model = tiny_prior(seed=8, double=True).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # large embeddings: predictions depend strongly on the inputs
            if "emb" in name:
                p.normal_(0, 1)
    grids = model.sample(2, top_k=1, generator=torch.Generator().manual_seed(0))
    assert grids.shape == (2, *GRID) and len(grids.unique()) > 3
    assert torch.equal(model.logits(grids).argmax(-1), model.to_tokens(grids))


def test_sample_shape_range_determinism_and_the_first_loss():
    model = tiny_prior(seed=5).eval()
    s1, s2, s3 = (model.sample(6, generator=torch.Generator().manual_seed(s)) for s in (0, 0, 1))
    assert s1.shape == (6, *GRID) and s1.dtype == torch.long and 0 <= s1.min() and s1.max() < N_CODES
    assert torch.equal(s1, s2) and not torch.equal(s1, s3)
    assert model(s1).item() == pytest.approx(math.log(N_CODES), rel=0.1)  # untrained: near uniform
    with pytest.raises(ValueError, match="must divide"):
        CodePrior(N_CODES, grid=(6, 4), patch=4)


def test_entropy_and_cross_entropy():
    counts = torch.tensor([3, 1, 0, 0])
    assert entropy(torch.tensor([10, 10, 10, 10])) / math.log(2) == pytest.approx(2.0)
    assert entropy(torch.tensor([5, 0])) == pytest.approx(0.0)
    assert entropy(counts, torch.ones(4)) / math.log(2) == pytest.approx(2.0)  # under a uniform reference: 2 bits
    p = torch.tensor([0.75, 0.25])
    assert entropy(counts) == pytest.approx(float(-(p * p.log()).sum()))


def test_prior_checkpoint_round_trip(tmp_path):
    import checkpoints
    args = dict(n_codes=N_CODES, grid=GRID, patch=2, d_model=32, n_layers=2, n_heads=2, dropout=0.0)
    model = tiny_prior()
    checkpoints.save_model(tmp_path / "p.pt", "prior", model, args, config={}, epoch=0, val_bits_per_code=1.0,
                           score=-1.0, unigram_bits_per_code=2.0, vqvae_checkpoint="")
    loaded, _ = checkpoints.load_model(tmp_path / "p.pt", kind="prior")
    codes = torch.randint(0, N_CODES, (2, *GRID))
    assert isinstance(loaded, CodePrior) and torch.equal(loaded(codes), model.eval()(codes))


def test_a_prior_of_whole_grids_refuses_a_condition_in_one_line():
    from utils import DataError
    model, codes = tiny_prior(), torch.randint(0, N_CODES, (2, *GRID))
    maps = torch.zeros(2, 256, 128, dtype=torch.long)
    for call in (lambda: model.loss(codes, maps), lambda: model.code_bits(codes, maps),
                 lambda: model.sample(2, maps)):
        with pytest.raises(DataError, match="^CodePrior: a prior of whole grids takes no condition$"):
            call()
    assert torch.equal(model.loss(codes), model(codes))  # forward is the loss


def test_train_prior_then_sample_end_to_end(trained, tmp_path):
    import csv

    from conftest import run
    assert "codes (16, 64, 32)" in trained.prior_log.stdout  # the newest VQ-VAE under ./runs, its own splits
    rows = list(csv.DictReader(open(trained.prior / "metrics.csv")))
    assert len(rows) == 1 and float(rows[-1]["val_bits_per_code"]) > 0
    assert (trained.prior / "best_prior.pt").exists() and (trained.prior / "bits.png").exists()
    out = tmp_path / "samples"
    r = run("sample.py", "--n_samples=6", "--n_real=6", "--top_k=5", "--c2st_steps=2", f"--out_dir={out}",
            cwd=trained.tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.load(open(out / "measures.json"))
    c = m["c2st"]
    assert c["n_real"] == c["n_fake"] == 6 and c["ci95"][0] <= c["accuracy"] <= c["ci95"][1]
    dc = m["density_coverage"]  # 4 training patients: halves of 2 patients (8 slices each, 6 used)
    assert dc["n_reference"] == 6 and dc["n"] == 6 and 0 <= dc["samples"]["coverage"] <= 1
    assert 0 <= dc["real"]["coverage"] <= 1 and dc["real"]["density"] >= 0
    assert m["nearest_train_ssim"]["samples"]["n"] == 6 and m["nearest_train_ssim"]["validation"]["n"] == 8
    assert m["symmetry"]["samples"]["n"] == 6 and m["symmetry"]["real"]["n"] == 6
    q = m["nearest_train_ssim"]["samples"]
    assert q["q1"] <= q["median"] <= q["q3"] <= q["max"] <= 1 and m["sampling_seconds"] > 0
    assert sorted(p.name for p in (out / "nifti").iterdir()) == [f"sample_00{i}.nii.gz" for i in range(6)]
    for name in ("samples.png", "samples_64.png", "samples_nearest.png"):
        assert (out / name).exists()
    first = nib.load(out / "nifti" / "sample_000.nii.gz").get_fdata()
    r = run("sample.py", "--n_samples=6", "--n_real=6", "--top_k=5", "--c2st_steps=2",
            f"--out_dir={tmp_path / 'again'}", cwd=trained.tmp)
    assert np.array_equal(first, nib.load(tmp_path / "again" / "nifti" / "sample_000.nii.gz").get_fdata())  # seeded


def test_augmented_copies_are_the_slices_flipped_zoomed_and_shifted():
    import dataset
    from phantom import phantom_slice
    x = np.stack([phantom_slice(c, 0, 4, 8) for c in (4, 9, 17)]).astype(np.float32)
    x = (x - x.min()) / np.ptp(x)
    plain = dataset.augment(x, np.random.default_rng(0), zoom=0, shift=0)
    assert all(np.allclose(p, s) or np.allclose(p, s[::-1]) for p, s in zip(plain, x))  # flipped or not, nothing else
    a, b = (dataset.augment(x, np.random.default_rng(s)) for s in (1, 1))
    assert np.array_equal(a, b) and a.shape == x.shape and a.dtype == x.dtype and 0 <= a.min() and a.max() <= 1
    assert not np.allclose(a, x) and not np.allclose(a, x[:, ::-1])


def test_the_prior_trains_on_augmented_grids_with_weight_decay_on_its_matrices(trained, tmp_path):
    import torch

    import stages
    from conftest import TINY_PRIOR, run
    r = run("train.py", *TINY_PRIOR, "--prior_n_epochs=1", "--prior_augment=2", "--prior_weight_decay=0.1",
            f"--vqvae_checkpoint={trained.out / 'best_model.pt'}", f"--out_dir={tmp_path / 'p'}", cwd=trained.tmp)
    assert r.returncode == 0 and "codes (48, 64, 32)" in r.stdout, r.stdout + r.stderr  # 16 slices and 2 copies
    stage = stages.PriorStage.__new__(stages.PriorStage)
    stage.cfg, stage.model = SimpleNamespace(prior_weight_decay=0.1), tiny_prior()
    decayed, plain = stage.param_groups()
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert {id(p) for p in decayed["params"]} == {id(p) for p in stage.model.parameters() if p.dim() == 2}
    assert torch.load(tmp_path / "p" / "best_prior.pt", weights_only=True)["config"]["prior_augment"] == 2
