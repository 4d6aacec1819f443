"""The prior designs measured against the one train.py uses (EXPERIMENTS.md, The prior). Each trains for the same
CPU minutes on a VQ-VAE run's codes, then draws 256 slices that sample.py's measures judge. Not used by the
project; kept so that the comparison can be rerun.

    python experiments/prior_designs.py --design=patches --vqvae_checkpoint=runs/gen-vqvae/best_model.pt

designs: patches   prior.CodePrior, the design train.py uses (2x2 patches, full causal attention)
         window    code by code, each attending to the 64 codes before it (two grid rows), rows read centre-out,
                   fed the previous, the three inward and the mirrored codes
         masked    MaskGIT (Chang et al. 2022): bidirectional over 2x2 patches, masked codes predicted, drawn in
                   12 rounds that keep the most confident
         hierarchy a 16x8 grid of top codes (k-means of the code vectors over 4x4 cells) modelled by a patches
                   prior, and the window prior conditioned on the top code of each cell and of its 4 neighbours
"""
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpoints  # noqa: E402
import dataset  # noqa: E402
import figures  # noqa: E402
import options  # noqa: E402
from job import lr_at  # noqa: E402
from metrics import judge, real_slices, reconstruct  # noqa: E402
from options import Option  # noqa: E402
from prior import CodePrior, centre_out, draw_code  # noqa: E402
from utils import make_folder, run_script, write_text  # noqa: E402

BLOCK = dict(
    design=Option("patches", choices=("patches", "window", "masked", "hierarchy")),
    vqvae_checkpoint=Option("runs/gen-vqvae/best_model.pt"),
    minutes=Option(8.0, above=0),     # training time, the same for every design
    out_dir=Option(None, kind=str),   # None = runs/design-<design>
    temperature=Option(0.9, above=0),
    seed=Option(0),
)
SETTINGS = dict(  # each design's learning rate and batch, as tuned for it at this budget
    patches=dict(lr=2e-3, batch=16, warmup=50), window=dict(lr=5e-3, batch=8, warmup=10),
    masked=dict(lr=1e-3, batch=16, warmup=50), hierarchy=dict(lr=5e-3, batch=8, warmup=10))


# ---- window: attention over the 64 codes before each one ----------------------------------------------------

def local_attention(q, k, v, window):
    """Causal attention in which position p sees positions p - window + 1 .. p, computed in blocks of `window`
    queries against their own and the previous block's keys: O(T * window), not O(T^2)."""
    b, h, t, hd = q.shape
    pad = -t % window
    q, k, v = (F.pad(z, (0, 0, 0, pad)).reshape(b * h, -1, window, hd) for z in (q, k, v))
    k, v = (torch.cat([F.pad(z, (0, 0, 0, 0, 1, 0))[:, :-1], z], dim=2) for z in (k, v))
    key = torch.arange(-window, window, device=q.device)
    mask = (key[None] <= key[window:, None]) & (key[None] > key[window:, None] - window)
    mask = mask & ((torch.arange(k.shape[1], device=q.device) > 0)[:, None, None] | (key >= 0))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).reshape(b, h, -1, hd)[:, :, :t]


class WindowBlock(nn.Module):
    def __init__(self, d, heads, window):
        super().__init__()
        self.heads, self.window = heads, window
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x, cache=None, pos=0):
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in self.qkv(self.ln1(x)).split(d, 2))
        if cache is None:
            y = local_attention(q, k, v, self.window)
        else:  # one new code at pos: the keys and values of the window up to it
            cache[0][:, :, pos], cache[1][:, :, pos] = k[:, :, 0], v[:, :, 0]
            first = max(0, pos + 1 - self.window)
            y = F.scaled_dot_product_attention(q, cache[0][:, :, first:pos + 1], cache[1][:, :, first:pos + 1])
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class WindowPrior(nn.Module):
    """Code by code, grid rows read centre-out, each row in order; inputs: the previous code, the three codes of the
    inward adjacent row, the mirrored code if read, row and column; window attention over the 64 codes before."""

    def __init__(self, n_codes, grid=(64, 32), d=64, layers=4, heads=4, window=64, n_top=0):
        super().__init__()
        self.n_codes, self.grid, self.T = n_codes, grid, grid[0] * grid[1]
        h, w = grid
        rows = centre_out(h)
        read = {r: i for i, r in enumerate(rows)}
        order = torch.tensor([r * w + c for r in rows for c in range(w)])
        position = torch.argsort(order)
        around = torch.full((self.T, 4), self.T)
        for t, s in enumerate(order.tolist()):
            r, c = divmod(s, w)
            for a in (r - 1, r + 1):
                if 0 <= a < h and read[a] < read[r]:
                    for j, cc in enumerate((c - 1, c, c + 1)):
                        if 0 <= cc < w:
                            around[t, j] = position[a * w + cc]
            if position[(h - 1 - r) * w + c] < t:
                around[t, 3] = position[(h - 1 - r) * w + c]
        self.register_buffer("order", order, persistent=False)
        self.register_buffer("around", around, persistent=False)
        self.tok, self.nb = nn.Embedding(n_codes + 1, d), nn.Embedding(4 * (n_codes + 1), d)
        self.row, self.col = nn.Embedding(h, d), nn.Embedding(w, d)
        self.top = nn.Embedding(5 * n_top, d) if n_top else None  # hierarchy: the cell's and its 4 neighbours'
        self.blocks = nn.ModuleList(WindowBlock(d, heads, window) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, n_codes)
        self.apply(CodePrior._init_weights)

    def step_inputs(self, known, positions, top):
        """known (B, T + 1) codes in reading order (n_codes where not drawn) -> inputs (B, L, d) at positions."""
        s = self.order[positions]
        slots = torch.arange(4, device=known.device) * (self.n_codes + 1)
        x = (self.tok(known[:, positions - 1])  # position 0 reads known[:, T]: nothing
             + self.nb(known[:, self.around[positions]] + slots).sum(2)
             + self.row(s // self.grid[1]) + self.col(s % self.grid[1]))
        if self.top is not None:
            r, c, (hh, ww) = s // self.grid[1] // 4, s % self.grid[1] // 4, top.shape[1:]
            n_top = self.top.num_embeddings // 5
            for i, (dr, dc) in enumerate(((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1))):
                x = x + self.top(top[:, (r + dr).clamp(0, hh - 1), (c + dc).clamp(0, ww - 1)] + i * n_top)
        return x

    def forward(self, codes, top=None):
        seq = codes.reshape(len(codes), -1)[:, self.order]
        known = torch.cat([seq, torch.full_like(seq[:, :1], self.n_codes)], 1)
        x = self.step_inputs(known, torch.arange(self.T, device=codes.device), top)
        for block in self.blocks:
            x = block(x)
        return F.cross_entropy(self.head(self.ln(x)).reshape(-1, self.n_codes), seq.reshape(-1))

    @torch.no_grad()
    def sample(self, n, temperature, generator, top=None):
        dev = self.order.device
        known = torch.full((n, self.T + 1), self.n_codes, dtype=torch.long, device=dev)
        caches = [[torch.zeros(n, b.heads, self.T, self.tok.embedding_dim // b.heads, device=dev) for _ in range(2)]
                  for b in self.blocks]
        for t in range(self.T):
            x = self.step_inputs(known, torch.tensor([t], device=dev), top)
            for block, cache in zip(self.blocks, caches):
                x = block(x, cache, t)
            known[:, t] = draw_code(self.head(self.ln(x))[:, 0], temperature, 0, generator)
        grid = torch.empty_like(known[:, :-1])
        grid[:, self.order] = known[:, :-1]
        return grid.reshape(n, *self.grid)


# ---- masked: MaskGIT over 2x2 patches -------------------------------------------------------------------------

class MaskedPrior(nn.Module):
    def __init__(self, n_codes, grid=(64, 32), d=128, layers=4, heads=4):
        super().__init__()
        self.n_codes, self.grid, self.heads = n_codes, grid, heads
        self.patches = CodePrior(n_codes, grid, 2, 8, 1, 1)  # only for its to_tokens / to_grid
        self.emb = nn.Embedding(4 * (n_codes + 1), d)
        self.pos = nn.Embedding(self.patches.n_tokens, d)
        self.blocks = nn.ModuleList(nn.TransformerEncoderLayer(d, heads, 4 * d, 0.0, "gelu", batch_first=True,
                                                               norm_first=True) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, 4 * n_codes)
        self.apply(CodePrior._init_weights)

    def logits(self, tokens):  # (B, T, 4) with n_codes for masked -> (B, T, 4, n_codes)
        x = self.emb(tokens + torch.arange(4, device=tokens.device) * (self.n_codes + 1)).sum(2) + self.pos.weight
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x)).view(*tokens.shape, self.n_codes)

    def forward(self, codes):
        tokens = self.patches.to_tokens(codes)
        mask = torch.rand(tokens.shape) < torch.cos(math.pi / 2 * torch.rand(len(tokens), 1, 1))
        return F.cross_entropy(self.logits(tokens.masked_fill(mask, self.n_codes))[mask], tokens[mask])

    @torch.no_grad()
    def sample(self, n, temperature, generator, rounds=12):
        tokens = torch.full((n, self.patches.n_tokens, 4), self.n_codes, dtype=torch.long)
        total = tokens[0].numel()
        for r in range(rounds):
            masked = tokens == self.n_codes
            probs = (self.logits(tokens) / temperature).softmax(-1)
            drawn = torch.multinomial(probs.view(-1, self.n_codes), 1, generator=generator).view(tokens.shape)
            drawn = torch.where(masked, drawn, tokens)
            noise = -torch.log(-torch.log(torch.rand(drawn.shape, generator=generator).clamp(1e-20, 1 - 1e-7)))
            confidence = (probs.gather(-1, drawn[..., None])[..., 0].clamp_min(1e-30).log()
                          + 4.5 * (1 - (r + 1) / rounds) * noise)
            confidence = confidence.masked_fill(~masked, math.inf).view(n, -1)
            keep_masked = int(total * math.cos(math.pi / 2 * (r + 1) / rounds))
            if keep_masked:
                least = confidence.sort(1).values[:, keep_masked - 1:keep_masked]
                drawn = drawn.view(n, -1).masked_fill(confidence <= least, self.n_codes).view(tokens.shape)
            tokens = drawn
        return self.patches.to_grid(tokens)


# ---- hierarchy: top codes, then the window prior given them -----------------------------------------------------

def top_codes(vqvae, codes, centroids=None, k=64, iters=25):
    """The code vectors averaged over 4x4 cells, each assigned its nearest of k centroids (Lloyd's algorithm on the
    training grids when centroids is None) -> (top grids (N, h/4, w/4), centroids)."""
    cells = F.avg_pool2d(vqvae.quantizer.embedding[codes].permute(0, 3, 1, 2), 4).permute(0, 2, 3, 1)
    flat = cells.reshape(-1, cells.shape[-1])
    if centroids is None:
        centroids = flat[torch.randperm(len(flat), generator=torch.Generator().manual_seed(0))[:k]].clone()
        for _ in range(iters):
            nearest = torch.cdist(flat, centroids).argmin(1)
            for j in range(k):
                if (nearest == j).any():
                    centroids[j] = flat[nearest == j].mean(0)
    return torch.cdist(flat, centroids).argmin(1).view(cells.shape[:3]), centroids


class Hierarchy(nn.Module):
    def __init__(self, vqvae, codes, n_codes):
        super().__init__()
        with torch.no_grad():
            self.top_train, self.centroids = top_codes(vqvae, codes)
        self.top_prior = CodePrior(64, tuple(self.top_train.shape[1:]), 1, 128, 4, 4)
        self.bottom = WindowPrior(n_codes, tuple(codes.shape[1:]), n_top=64)
        self.top_share = 90 / 510  # of the minutes: the 128-code top grid learns fast

    @torch.no_grad()
    def sample(self, n, temperature, generator):
        top = self.top_prior.sample(n, temperature=temperature, generator=generator)
        return self.bottom.sample(n, temperature, generator, top)


# ---- the comparison ---------------------------------------------------------------------------------------------

def fit(model, codes, seconds, lr, batch, warmup, loss=None):
    """AdamW with train.py's schedule (warm-up, cosine to 10% over the time) for `seconds`."""
    loss = loss or model
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    t0, step, rng = time.time(), 0, np.random.default_rng(0)
    while time.time() - t0 < seconds:
        for idx in np.array_split(rng.permutation(len(codes)), len(codes) // batch):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, (time.time() - t0) / seconds, lr, warmup)
            value = loss(idx)
            opt.zero_grad()
            value.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            if time.time() - t0 >= seconds:
                break
    return step


def build_and_fit(design, vqvae, codes, seconds):
    n_codes, s = vqvae.quantizer.n_embeddings, SETTINGS[design]
    torch.manual_seed(0)
    if design == "hierarchy":
        model = Hierarchy(vqvae, codes, n_codes)
        top_s = seconds * model.top_share
        steps = fit(model.top_prior, model.top_train, top_s, 2e-3, 32, 20,
                    lambda i: model.top_prior(model.top_train[i]))
        steps += fit(model.bottom, codes, seconds - top_s, s["lr"], s["batch"], s["warmup"],
                     lambda i: model.bottom(codes[i], model.top_train[i]))
        return model, steps
    model = dict(patches=lambda: CodePrior(n_codes, tuple(codes.shape[1:]), 2, 128, 4, 4),
                 window=lambda: WindowPrior(n_codes, tuple(codes.shape[1:])),
                 masked=lambda: MaskedPrior(n_codes, tuple(codes.shape[1:])))[design]()
    return model, fit(model, codes, seconds, s["lr"], s["batch"], s["warmup"], lambda i: model(codes[i]))


def main(argv):
    cfg = options.parse(BLOCK, argv)
    out = cfg.out_dir or os.path.join("runs", f"design-{cfg.design}")
    make_folder(out)
    vqvae, ckpt = checkpoints.load_model(cfg.vqvae_checkpoint, "cpu", "vqvae")
    splits = dataset.read_splits(os.path.dirname(cfg.vqvae_checkpoint))
    train_x = dataset.prepare(splits["train"], ckpt["config"]["cache_dir"], True, desc="train")["x"]
    codes = torch.from_numpy(reconstruct(vqvae, train_x, "cpu")[1])
    model, steps = build_and_fit(cfg.design, vqvae, codes, cfg.minutes * 60)
    model.eval()
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.time()
    grids = torch.cat([model.sample(64, temperature=cfg.temperature, generator=gen) for _ in range(4)])
    samples = torch.cat([vqvae.decode(g).float().clamp(0, 1) for g in grids.split(64)])
    seconds = time.time() - t0
    real = real_slices(vqvae, splits, ckpt["config"]["cache_dir"], torch.device("cpu"))
    measures, _, _ = judge(samples, real, seed=cfg.seed)  # sample.py's measures, at its defaults
    write_text(os.path.join(out, "measures.json"), json.dumps(dict(design=cfg.design, steps=steps,
                                                                   sampling_seconds=seconds, **measures), indent=1))
    figures.plot_grid(samples[:16, 0].numpy(), os.path.join(out, "samples.png"))
    print(f"{cfg.design}: {steps} steps; 256 samples in {seconds:.0f} s -> {out}")
    print(json.dumps(measures, indent=1))


if __name__ == "__main__":
    run_script(main)
