import math

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from modules import CodePrior, local_causal_attention
from utils import entropy

N_CODES = 8
GRID = (4, 4)


def tiny_prior(seed=0, double=False, window=0):
    torch.manual_seed(seed)
    model = CodePrior(N_CODES, grid=GRID, d_model=32, n_layers=2, n_heads=2, window=window)
    return model.double() if double else model


def counting_grids(n, gen):
    """code[t] = (code[t-1] + 1) % 8 in raster order from a random first code:
    unigram is uniform (3 bits) but only the first code carries information."""
    first = torch.randint(0, N_CODES, (n, 1), generator=gen)
    steps = torch.arange(GRID[0] * GRID[1])
    return ((first + steps) % N_CODES).reshape(n, *GRID)


def test_learns_structured_codes():
    gen = torch.Generator().manual_seed(1)
    model = tiny_prior()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(250):
        loss = model(counting_grids(32, gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    test_codes = counting_grids(256, gen)
    with torch.no_grad():
        bits = model(test_codes).item() / math.log(2)
    base = unigram_bits(test_codes)
    assert base == pytest.approx(3.0, abs=0.05)
    assert bits < 0.5 * base, (bits, base)


@pytest.mark.parametrize("temperature,top_k,window", [(1.0, 0, 0), (0.8, 3, 0), (1.0, 0, 5)])
def test_cached_equals_uncached(temperature, top_k, window):
    model = tiny_prior(seed=3, double=True, window=window).eval()
    kw = dict(temperature=temperature, top_k=top_k)
    a = model.sample(5, generator=torch.Generator().manual_seed(7), use_cache=True, **kw)
    b = model.sample(5, generator=torch.Generator().manual_seed(7), use_cache=False, **kw)
    assert torch.equal(a, b)


@pytest.mark.parametrize("window", [0, 3, 6])
def test_cached_logits_match_full_forward(window):
    # Stronger than sample equality: step-by-step cached logits equal the full pass.
    model = tiny_prior(seed=4, double=True, window=window).eval()
    idx = torch.randint(0, N_CODES, (3, 16))
    full = model.logits(idx)
    caches = model.new_caches(3, idx.device, torch.float64)
    tokens = model.with_start(idx)
    known = model.known_grid(idx)
    steps = [model.forward_tokens(tokens[:, t:t + 1], known, caches, pos=t) for t in range(16)]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-10)
    # Multi-token chunks through the cache (masked path) agree too.
    caches = model.new_caches(3, idx.device, torch.float64)
    chunks = [model.forward_tokens(tokens[:, s:s + 5], known, caches, pos=s) for s in (0, 5, 10, 15)]
    assert torch.allclose(torch.cat(chunks, dim=1), full, atol=1e-10)


@pytest.mark.parametrize("t,window", [(2048, 64), (100, 32), (50, 64), (7, 1)])
def test_local_attention_equals_masked_full_attention(t, window):
    gen = torch.Generator().manual_seed(t)
    q, k, v = (torch.randn(2, 3, t, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    p = torch.arange(t)
    mask = (p[None] <= p[:, None]) & (p[None] > p[:, None] - window)  # key <= query, at most window - 1 back
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.allclose(local_causal_attention(q, k, v, window), expected, atol=1e-12)


def test_above_neighbours_come_from_the_row_above():
    model = tiny_prior()
    known = model.known_grid(torch.arange(16).reshape(1, 16))  # code = position on the 4x4 grid
    got = model.neighbours_above(known, torch.tensor([0, 4, 5, 7])) - torch.arange(3) * (N_CODES + 1)
    start = model.start_token
    assert got[0].tolist() == [[start, start, start],  # first row: nothing above
                               [start, 0, 1],          # left edge: no above-left
                               [0, 1, 2],
                               [2, 3, start]]          # right edge: no above-right


def test_sample_shape_range_determinism():
    model = tiny_prior(seed=5).eval()
    s1 = model.sample(6, generator=torch.Generator().manual_seed(0))
    s2 = model.sample(6, generator=torch.Generator().manual_seed(0))
    s3 = model.sample(6, generator=torch.Generator().manual_seed(1))
    assert s1.shape == (6, *GRID) and s1.dtype == torch.long
    assert s1.min() >= 0 and s1.max() < N_CODES
    assert torch.equal(s1, s2)
    assert not torch.equal(s1, s3)


@pytest.mark.parametrize("window", [0, 3])
def test_forward_is_causal(window):
    model = tiny_prior(seed=6, double=True, window=window).eval()
    idx = torch.randint(0, N_CODES, (2, 16))
    base = model.logits(idx)
    for t in (0, 7, 15):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % N_CODES
        out = model.logits(changed)
        # position t predicts idx[:, t] from idx[:, :t], so logits <= t are unaffected
        assert torch.equal(out[:, :t + 1], base[:, :t + 1])
        if t < 15:
            assert not torch.allclose(out[:, t + 1:], base[:, t + 1:])


def test_forward_and_loss_shapes():
    model = tiny_prior()
    assert model.logits(torch.zeros(2, 10, dtype=torch.long)).shape == (2, 10, N_CODES)
    loss = model(torch.zeros(2, *GRID, dtype=torch.long))
    assert loss.dim() == 0
    # Untrained model starts near uniform: ~ln 8 nats.
    assert loss.item() == pytest.approx(math.log(N_CODES), rel=0.1)


def unigram_bits(codes):
    return entropy(torch.bincount(codes.flatten(), minlength=N_CODES)) / math.log(2)


def test_entropy_and_cross_entropy():
    uniform4 = torch.arange(4).repeat(10).reshape(10, 2, 2)
    assert unigram_bits(uniform4) == pytest.approx(2.0)
    assert unigram_bits(torch.zeros(3, 2, 2, dtype=torch.long)) == pytest.approx(0.0)
    counts = torch.tensor([3, 1, 0, 0])
    # bits per code of these codes under a uniform distribution over 4 codes: 2, whatever the codes
    assert entropy(counts, torch.ones(4)) / math.log(2) == pytest.approx(2.0)
    p = torch.tensor([0.75, 0.25])
    assert entropy(counts) == pytest.approx(float(-(p * p.log()).sum()))


def test_prior_checkpoint_round_trip(tmp_path):
    from modules import load_model
    from utils import atomic_torch_save
    args = dict(n_codes=N_CODES, grid=GRID, d_model=32, n_layers=2, n_heads=2, dropout=0.0)
    model = tiny_prior()
    atomic_torch_save(dict(kind="prior", model=model.state_dict(), model_args=args), tmp_path / "p.pt")
    loaded, ckpt = load_model(tmp_path / "p.pt")
    codes = torch.randint(0, N_CODES, (2, *GRID))
    assert isinstance(loaded, CodePrior) and torch.equal(loaded(codes), model.eval()(codes))


def test_train_prior_then_sample_end_to_end(tmp_path):
    import csv
    import json

    from conftest import TINY, make_study, run
    root = make_study(tmp_path / "d", per_case=3)
    r = run("train.py", f"--data_dir={root}", f"--out_dir={tmp_path / 'runs' / 'vq'}", "--n_epochs=1", *TINY,
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    prior = ["--stage=prior", f"--out_dir={tmp_path / 'runs' / 'prior'}", "--prior_d_model=16", "--prior_n_layers=1",
             "--prior_n_heads=2", "--prior_n_epochs=2", "--prior_batch_size=4", "--prior_warmup_steps=2", "--cache_dir=None"]
    r = run("train.py", *prior, cwd=tmp_path)  # finds the newest VQ-VAE under ./runs
    assert r.returncode == 0, r.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "runs" / "prior" / "metrics.csv")))
    assert len(rows) == 2 and float(rows[-1]["val_bits_per_code"]) > 0
    assert (tmp_path / "runs" / "prior" / "best_prior.pt").exists() and (tmp_path / "runs" / "prior" / "bits.png").exists()
    out = tmp_path / "samples"
    r = run("sample.py", "--n_samples=3", "--top_k=5", "--temperature=0.9", f"--out_dir={out}", "--n_reference=4",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    nov = json.load(open(out / "novelty.json"))
    assert nov["samples_to_nearest_train_ssim"]["n"] == 3 and nov["validation_to_nearest_train_ssim"]["n"] == 3
    assert nov["validation_recon_to_nearest_train_ssim"]["n"] == 3
    q = nov["samples_to_nearest_train_ssim"]
    assert q["q1"] <= q["median"] <= q["q3"] <= q["max"] <= 1
    c = nov["c2st"]
    assert c["n_fit"] + c["n_test"] == 6 and c["ci95"][0] <= c["accuracy"] <= c["ci95"][1]
    assert 0 <= nov["coverage"] <= 1 and set(nov["diversity"]) == {"samples_median_pairwise_ssim",
                                                                   "validation_recon_median_pairwise_ssim"}
    assert sorted(p.name for p in (out / "nifti").iterdir()) == [f"sample_00{i}.nii.gz" for i in range(3)]
    assert (out / "samples.png").exists() and (out / "samples_nearest.png").exists()
    first = nib.load(out / "nifti" / "sample_000.nii.gz").get_fdata()
    r = run("sample.py", "--n_samples=3", "--top_k=5", "--temperature=0.9", f"--out_dir={tmp_path / 'again'}",
            "--n_reference=4", cwd=tmp_path)
    assert np.array_equal(first, nib.load(tmp_path / "again" / "nifti" / "sample_000.nii.gz").get_fdata())  # seeded
