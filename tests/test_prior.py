import math

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from metrics import entropy
from modules import CodePrior, local_causal_attention, scan_rows

N_CODES = 8
GRID = (4, 4)


def grid_logits(model, codes):
    """codes (B, h, w) -> (B, h, w, n_codes): at each grid position, the prediction of its code from the codes read
    before it."""
    return model.to_grid(model.logits(model.to_sequence(codes)))


def tiny_prior(seed=0, double=False, window=0, scan="raster", **kw):
    torch.manual_seed(seed)
    model = CodePrior(N_CODES, grid=GRID, d_model=32, n_layers=2, n_heads=2, window=window, scan=scan, **kw)
    return model.double() if double else model


# every scan with and without a global layer (the last of the two blocks), each with a window
COMBOS = [dict(scan=s, n_global_layers=g) for s in ("raster", "centre_out") for g in (0, 1)]


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


@pytest.mark.parametrize("temperature,top_k,window,kw", [(1.0, 0, 0, {}), (0.8, 3, 0, {}), (1.0, 0, 5, {})]
                         + [(1.0, 0, 3, c) for c in COMBOS] + [(0.8, 3, 3, dict(scan="centre_out", n_global_layers=1))])
def test_cached_equals_uncached(temperature, top_k, window, kw):
    model = tiny_prior(seed=3, double=True, window=window, **kw).eval()
    kw = dict(temperature=temperature, top_k=top_k)
    a = model.sample(5, generator=torch.Generator().manual_seed(7), use_cache=True, **kw)
    b = model.sample(5, generator=torch.Generator().manual_seed(7), use_cache=False, **kw)
    assert torch.equal(a, b)


@pytest.mark.parametrize("window,kw", [(0, {}), (3, {}), (6, {})] + [(3, c) for c in COMBOS])
def test_cached_logits_match_full_forward(window, kw):
    # Stronger than sample equality: step-by-step cached logits equal the full pass.
    model = tiny_prior(seed=4, double=True, window=window, **kw).eval()
    idx = torch.randint(0, N_CODES, (3, 16))
    full = model.logits(idx)
    caches = model.new_caches(3, idx.device, torch.float64)
    tokens = model.with_start(idx)
    known = model.known_codes(idx)
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
    known = model.known_codes(torch.arange(16).reshape(1, 16))  # code = position on the 4x4 grid
    got = model.neighbours(known, torch.tensor([0, 4, 5, 7])) - torch.arange(3) * (N_CODES + 1)
    start = model.start_token
    assert got[0].tolist() == [[start, start, start],  # first row: nothing above
                               [start, 0, 1],          # left edge: no above-left
                               [0, 1, 2],
                               [2, 3, start]]          # right edge: no above-right


def test_centre_out_neighbours_are_the_inward_row_and_the_mirror():
    # 16 codes so that code = spatial position on the 4x4 grid; rows are read 1, 2, 0, 3
    torch.manual_seed(0)
    model = CodePrior(16, grid=GRID, d_model=8, n_layers=1, n_heads=1, scan="centre_out")
    assert model.mirror_input and model.above_emb.num_embeddings == 4 * 17
    known = model.known_codes(model.to_sequence(torch.arange(16).reshape(1, 4, 4)))
    got = model.neighbours(known, torch.tensor([0, 4, 9, 15])) - torch.arange(4) * 17
    s = model.start_token
    assert got[0].tolist() == [[s, s, s, s],       # (1, 0): first row read, no inward row; mirror (2, 0) not yet read
                               [s, 4, 5, 4],       # (2, 0): inward row 1; mirror (1, 0) read
                               [4, 5, 6, s],       # (0, 1): inward row 1; mirror (3, 1) read later
                               [10, 11, s, 3]]     # (3, 3): inward row 2; mirror (0, 3) read
    # a prefix: what is not yet read is start_token
    known = model.known_codes(model.to_sequence(torch.arange(16).reshape(1, 4, 4))[:, :4])
    assert (model.neighbours(known, torch.tensor([4]))[0, 0] - torch.arange(4) * 17).tolist() == [s, 4, 5, 4]
    assert (model.neighbours(known, torch.tensor([15]))[0, 0] - torch.arange(4) * 17).tolist() == [s, s, s, s]


@pytest.mark.parametrize("h", range(1, 10))
def test_centre_out_scan_is_a_permutation_read_from_the_middle(h):
    rows = scan_rows(h, "centre_out")
    assert sorted(rows) == list(range(h)) and scan_rows(h, "raster") == list(range(h))
    rank = {r: i for i, r in enumerate(rows)}
    for r in rows:
        assert abs(rank[r] - rank[h - 1 - r]) <= 1  # the mirror partner is read just before or after
        if r != rows[0]:  # the inward neighbour is already read
            assert min(rank.get(r - 1, h), rank.get(r + 1, h)) < rank[r]


def test_centre_out_rows_for_64():
    rows = scan_rows(64, "centre_out")
    assert rows[:6] == [31, 32, 30, 33, 29, 34] and rows[-2:] == [0, 63]


@pytest.mark.parametrize("grid", [(4, 4), (5, 3), (64, 32)])
def test_to_sequence_and_to_grid_round_trip(grid):
    model = CodePrior(8, grid=grid, d_model=8, n_layers=1, n_heads=1, scan="centre_out")
    h, w = grid
    codes = torch.arange(2 * h * w).reshape(2, h, w)
    seq = model.to_sequence(codes)
    assert torch.equal(model.to_grid(seq), codes)
    assert torch.equal(model.to_sequence(model.to_grid(seq)), seq)
    assert torch.equal(model.to_sequence(codes.reshape(2, -1)), seq)  # flattened grids are accepted too
    # reading order: whole rows, in scan_rows order, each left to right
    assert torch.equal(seq[0], torch.cat([torch.arange(w) + r * w for r in scan_rows(h, "centre_out")]))
    logits = torch.randn(2, h * w, 3)
    assert torch.equal(model.to_grid(logits)[:, 1, 2], logits[:, int(model.inverse[w + 2])])
    with pytest.raises(ValueError):
        CodePrior(8, grid=grid, d_model=8, n_layers=1, n_heads=1, scan="spiral")
    with pytest.raises(ValueError):
        CodePrior(8, grid=grid, d_model=8, n_layers=1, n_heads=1, n_global_layers=2)


@pytest.mark.parametrize("scan", ["raster", "centre_out"])
def test_sample_is_in_spatial_layout(scan):
    # Greedy sampling draws, at each position, the argmax of the prediction from what was drawn before; so the
    # sampled grid, scored by teacher forcing in spatial layout, has every code its own argmax. The same codes
    # laid out in reading order (a sample that forgot to put them back) do not.
    model = tiny_prior(seed=8, double=True, window=3, scan=scan).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # large embeddings: predictions depend strongly on the inputs
            if "emb" in name:
                p.normal_(0, 1)
        grids = model.sample(2, top_k=1, generator=torch.Generator().manual_seed(0))
        assert grids.shape == (2, *GRID) and len(grids.unique()) > 3
        assert torch.equal(grid_logits(model, grids).argmax(-1), grids)
        if scan == "centre_out":
            in_reading_order = model.to_sequence(grids).reshape(2, *GRID)
            assert not torch.equal(grid_logits(model, in_reading_order).argmax(-1), in_reading_order)


def test_centre_out_reads_the_middle_rows_first():
    # rows are read 1, 2, 0, 3: a code on spatial row 0 cannot change the predictions on rows 1 and 2 (read
    # before it) but does change row 3's; one on row 1 changes the predictions on all later rows
    model = tiny_prior(seed=9, double=True, window=0, scan="centre_out").eval()
    codes = torch.randint(0, N_CODES, (2, *GRID), generator=torch.Generator().manual_seed(1))
    base = grid_logits(model, codes)
    changed = codes.clone()
    changed[:, 0, 3] = (changed[:, 0, 3] + 1) % N_CODES
    out = grid_logits(model, changed)
    assert torch.equal(out[:, 1:3], base[:, 1:3]) and torch.equal(out[:, 0, :], base[:, 0, :])
    assert not torch.allclose(out[:, 3], base[:, 3])
    changed = codes.clone()
    changed[:, 1, 3] = (changed[:, 1, 3] + 1) % N_CODES
    out = grid_logits(model, changed)
    assert torch.equal(out[:, 1, :], base[:, 1, :])
    for r in (2, 0, 3):
        assert not torch.allclose(out[:, r], base[:, r])


def test_positions_embed_their_spatial_row_and_column():
    # window 1 and no code inputs (zeroed embeddings): each logit is a function of its position's embeddings
    # alone, so a centre_out model with a raster model's weights makes the same prediction at each grid position
    raster = tiny_prior(seed=11, double=True, window=1).eval()
    centre = tiny_prior(seed=12, double=True, window=1, scan="centre_out", mirror_input=False).eval()
    with torch.no_grad():
        raster.tok_emb.weight.zero_()
        raster.above_emb.weight.zero_()
        centre.load_state_dict(raster.state_dict())
        codes = torch.randint(0, N_CODES, (2, *GRID), generator=torch.Generator().manual_seed(3))
        assert torch.allclose(grid_logits(centre, codes), grid_logits(raster, codes), atol=1e-12)
        assert not torch.allclose(centre.logits(codes.reshape(2, -1)), raster.logits(codes.reshape(2, -1)))


def test_global_layer_sees_the_whole_prefix():
    # window 1: a block sees only its own position, so with no global layer the logit at t depends only on t's
    # inputs (the previous code and the row above); the raster code at 0 is an input at 1 (previous) and at 4, 5
    # (above, above-left). One global layer makes every later position depend on it.
    idx = torch.randint(0, N_CODES, (2, 16), generator=torch.Generator().manual_seed(2))
    changed = idx.clone()
    changed[:, 0] = (changed[:, 0] + 1) % N_CODES
    for n_global, expected in ((0, {1, 4, 5}), (1, set(range(1, 16)))):
        model = tiny_prior(seed=10, double=True, window=1, n_global_layers=n_global).eval()
        assert [b.attn.window for b in model.blocks] == [1, 1 if n_global == 0 else 0]
        diff = (model.logits(changed) - model.logits(idx)).abs().amax(dim=(0, 2))
        assert {t for t in range(16) if diff[t] > 0} == expected


def test_sample_shape_range_determinism():
    model = tiny_prior(seed=5).eval()
    s1 = model.sample(6, generator=torch.Generator().manual_seed(0))
    s2 = model.sample(6, generator=torch.Generator().manual_seed(0))
    s3 = model.sample(6, generator=torch.Generator().manual_seed(1))
    assert s1.shape == (6, *GRID) and s1.dtype == torch.long
    assert s1.min() >= 0 and s1.max() < N_CODES
    assert torch.equal(s1, s2)
    assert not torch.equal(s1, s3)


@pytest.mark.parametrize("window,kw", [(0, {}), (3, {})] + [(3, c) for c in COMBOS])
def test_forward_is_causal(window, kw):
    # sequence positions: under centre_out idx is in reading order, not the flattened grid
    model = tiny_prior(seed=6, double=True, window=window, **kw).eval()
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


@pytest.mark.parametrize("new", [dict(scan="raster"), dict(scan="centre_out", n_global_layers=1, window=3)])
def test_prior_checkpoint_round_trip(tmp_path, new):
    import checkpoints
    args = dict(n_codes=N_CODES, grid=GRID, d_model=32, n_layers=2, n_heads=2, dropout=0.0, **new)
    model = tiny_prior(**new)
    checkpoints.save(tmp_path / "p.pt", "prior", model=model.state_dict(), model_args=args, config={}, epoch=0,
                     val_bits_per_code=1.0, score=-1.0, unigram_bits_per_code=2.0, vqvae_checkpoint="")
    loaded, ckpt = checkpoints.load_model(tmp_path / "p.pt", kind="prior")
    codes = torch.randint(0, N_CODES, (2, *GRID))
    assert isinstance(loaded, CodePrior) and torch.equal(loaded(codes), model.eval()(codes))


def test_train_prior_then_sample_end_to_end(trained, tmp_path):
    import csv
    import json

    from conftest import run
    assert "codes (16, 64, 32)" in trained.prior_log.stdout  # the newest VQ-VAE under ./runs, its own splits
    rows = list(csv.DictReader(open(trained.prior / "metrics.csv")))
    assert len(rows) == 1 and float(rows[-1]["val_bits_per_code"]) > 0
    assert (trained.prior / "best_prior.pt").exists() and (trained.prior / "bits.png").exists()
    out = tmp_path / "samples"
    r = run("sample.py", "--n_samples=3", "--top_k=5", "--temperature=0.9", f"--out_dir={out}", "--n_reference=4",
            cwd=trained.tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    nov = json.load(open(out / "novelty.json"))
    assert nov["samples_to_nearest_train_ssim"]["n"] == 3 and nov["validation_to_nearest_train_ssim"]["n"] == 4
    assert nov["validation_recon_to_nearest_train_ssim"]["n"] == 4
    q = nov["samples_to_nearest_train_ssim"]
    assert q["q1"] <= q["median"] <= q["q3"] <= q["max"] <= 1
    c = nov["c2st"]
    assert c["n_fit"] + c["n_test"] == 6 and c["ci95"][0] <= c["accuracy"] <= c["ci95"][1]
    cov = nov["coverage"]  # two validation patients (2 of the 4 slices each): one half covered by the other
    assert cov["n_real"] == cov["n_cover"] == 2 and 0 <= cov["samples"] <= 1 and 0 <= cov["validation_recon"] <= 1
    assert set(nov["diversity"]) == {"samples_median_pairwise_ssim", "validation_recon_median_pairwise_ssim"}
    assert nov["symmetry"]["samples"]["n"] == 3 and nov["symmetry"]["validation_recon"]["n"] == 4
    assert sorted(p.name for p in (out / "nifti").iterdir()) == [f"sample_00{i}.nii.gz" for i in range(3)]
    assert (out / "samples.png").exists() and (out / "samples_nearest.png").exists()
    first = nib.load(out / "nifti" / "sample_000.nii.gz").get_fdata()
    r = run("sample.py", "--n_samples=3", "--top_k=5", "--temperature=0.9", f"--out_dir={tmp_path / 'again'}",
            "--n_reference=4", cwd=trained.tmp)
    assert np.array_equal(first, nib.load(tmp_path / "again" / "nifti" / "sample_000.nii.gz").get_fdata())  # seeded
