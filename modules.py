"""The VQ-VAE (van den Oord et al. 2017): Encoder -> VectorQuantizer -> Decoder, and the prior over its codes.

A 256x128 slice becomes a 64x32 grid of indices into a codebook of n_embeddings vectors of size embedding_dim.
CodePrior models that grid autoregressively, p(c) = prod_t p(c_t | c_<t), reading the grid rows in the order its
`scan` gives (centre-out by default), so that sampled grids decode to new slices. Its loss is in nats per code;
divided by ln 2 it is bits per code.
"""
from collections import OrderedDict

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class ResidualLayer(nn.Module):
    def __init__(self, n_hiddens, n_residual_hiddens):
        super().__init__()
        self.block = nn.Sequential(
            nn.ReLU(), nn.Conv2d(n_hiddens, n_residual_hiddens, 3, padding=1),
            nn.ReLU(), nn.Conv2d(n_residual_hiddens, n_hiddens, 1))

    def forward(self, x):
        return x + self.block(x)


class ResidualStack(nn.Module):
    """n_residual_layers layers, each with its own weights."""

    def __init__(self, n_hiddens, n_residual_hiddens, n_residual_layers):
        super().__init__()
        self.layers = nn.Sequential(*[ResidualLayer(n_hiddens, n_residual_hiddens) for _ in range(n_residual_layers)])

    def forward(self, x):
        return F.relu(self.layers(x))


class Encoder(nn.Module):
    """(N, 1, H, W) -> (N, embedding_dim, H/4, W/4): two stride-2 convolutions, then residual layers."""

    def __init__(self, n_hiddens, n_residual_hiddens, n_residual_layers, embedding_dim):
        super().__init__()
        self.net = nn.Sequential(OrderedDict(
            down1=nn.Conv2d(1, n_hiddens // 2, 4, stride=2, padding=1), relu1=nn.ReLU(),
            down2=nn.Conv2d(n_hiddens // 2, n_hiddens, 4, stride=2, padding=1), relu2=nn.ReLU(),
            conv=nn.Conv2d(n_hiddens, n_hiddens, 3, padding=1),
            residual=ResidualStack(n_hiddens, n_residual_hiddens, n_residual_layers),
            project=nn.Conv2d(n_hiddens, embedding_dim, 1)))

    def forward(self, x):
        return self.net(x)


class Decoder(nn.Module):
    """(N, embedding_dim, H/4, W/4) -> (N, 1, H, W), the mirror of the encoder."""

    def __init__(self, n_hiddens, n_residual_hiddens, n_residual_layers, embedding_dim):
        super().__init__()
        self.net = nn.Sequential(OrderedDict(
            conv=nn.Conv2d(embedding_dim, n_hiddens, 3, padding=1),
            residual=ResidualStack(n_hiddens, n_residual_hiddens, n_residual_layers),
            up1=nn.ConvTranspose2d(n_hiddens, n_hiddens // 2, 4, stride=2, padding=1), relu=nn.ReLU(),
            up2=nn.ConvTranspose2d(n_hiddens // 2, 1, 4, stride=2, padding=1)))

    def forward(self, z):
        return self.net(z)


class VectorQuantizer(nn.Module):
    """Nearest-codebook quantiser with an exponential-moving-average codebook and dead-code restarts.

    Loss: beta * ||z - sg(e)||^2 (the commitment term; the codebook itself learns by EMA, not by gradient).
    Straight-through gradient: the decoder's gradient passes to z unchanged. Distances are computed in fp32.
    A code whose EMA count falls below `dead_threshold` assignments per step is moved onto a random encoder
    output of the current batch; all codes start dead, so the first batch initialises the codebook from data.
    Under torch.distributed, counts and sums are all-reduced and restart candidates come from rank 0, so every
    rank holds the same codebook.
    """

    def __init__(self, n_embeddings, embedding_dim, beta=0.25, decay=0.99, dead_threshold=1.0, eps=1e-5):
        super().__init__()
        self.n_embeddings, self.embedding_dim = n_embeddings, embedding_dim
        self.beta, self.decay, self.dead_threshold, self.eps = beta, decay, dead_threshold, eps
        self.register_buffer("embedding", torch.zeros(n_embeddings, embedding_dim))
        self.register_buffer("cluster_size", torch.zeros(n_embeddings))
        self.register_buffer("embed_sum", torch.zeros(n_embeddings, embedding_dim))

    def nearest(self, flat):
        """Index of the nearest code for each row of flat (M, D), in fp32."""
        e = self.embedding
        d = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e.t() + e.pow(2).sum(1)
        return d.argmin(1)

    @torch.no_grad()
    def ema_update(self, flat, idx):
        counts = code_counts(idx, self.n_embeddings)
        sums = torch.zeros_like(self.embed_sum).index_add_(0, idx, flat)
        candidates = flat[torch.randint(0, flat.shape[0], (self.n_embeddings,), device=flat.device)]
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
            dist.broadcast(candidates, 0)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.n_embeddings * self.eps) * n  # Laplace smoothing
        self.embedding.copy_(self.embed_sum / smoothed[:, None])
        # restart dead codes without a host sync: torch.where instead of `if dead.any()`
        dead = self.cluster_size < self.dead_threshold
        self.embedding.copy_(torch.where(dead[:, None], candidates, self.embedding))
        self.embed_sum.copy_(torch.where(dead[:, None], candidates * self.dead_threshold, self.embed_sum))
        self.cluster_size.copy_(torch.where(dead, torch.full_like(self.cluster_size, self.dead_threshold),
                                            self.cluster_size))

    def forward(self, z):
        """z (N, D, h, w) -> (z_q with straight-through gradient, commitment loss, indices (N, h, w))."""
        n, d, h, w = z.shape
        with torch.autocast(z.device.type, enabled=False):
            z = z.float()
            flat = z.permute(0, 2, 3, 1).reshape(-1, d)
            idx = self.nearest(flat)
            if self.training:
                self.ema_update(flat.detach(), idx)
            zq = self.embedding[idx].view(n, h, w, d).permute(0, 3, 1, 2)
            loss = self.beta * F.mse_loss(z, zq.detach())
            zq = z + (zq - z).detach()
        return zq, loss, idx.view(n, h, w)

    def lookup(self, idx):
        """Code indices (N, h, w) -> code vectors (N, D, h, w)."""
        return self.embedding[idx].permute(0, 3, 1, 2)


def code_counts(idx, n_codes, dtype=torch.float32):
    """How often each of n_codes occurs in idx. Unlike torch.bincount on CUDA, it does not read the largest index
    back to the host, so the training step has no host synchronisation."""
    flat = idx.reshape(-1)
    return torch.zeros(n_codes, dtype=dtype, device=idx.device).index_add_(0, flat, torch.ones_like(flat, dtype=dtype))


class VQVAE(nn.Module):
    def __init__(self, n_hiddens=128, n_residual_hiddens=32, n_residual_layers=2, embedding_dim=64,
                 n_embeddings=512, beta=0.25, ema_decay=0.99):
        super().__init__()
        self.encoder = Encoder(n_hiddens, n_residual_hiddens, n_residual_layers, embedding_dim)
        self.quantizer = VectorQuantizer(n_embeddings, embedding_dim, beta, ema_decay)
        self.decoder = Decoder(n_hiddens, n_residual_hiddens, n_residual_layers, embedding_dim)

    def forward(self, x):
        """x (N, 1, H, W) in [0, 1] -> (reconstruction, commitment loss, code indices (N, H/4, W/4))."""
        zq, loss, idx = self.quantizer(self.encoder(x))
        return self.decoder(zq), loss, idx

    @torch.no_grad()
    def decode(self, idx):
        return self.decoder(self.quantizer.lookup(idx))


# ---- the prior over code grids ----------------------------------------------------------------------------------

def window_mask(query, key, window):
    """Boolean (len(query), len(key)): query position p may attend to key position k when k <= p and, with a
    window, k > p - window. The one rule both the full and the cached attention paths use."""
    allowed = key[None] <= query[:, None]
    return allowed & (key[None] > query[:, None] - window) if window else allowed


def local_causal_attention(q, k, v, window):
    """q, k, v (B, H, T, hd) -> (B, H, T, hd): causal attention in which position p sees only the `window`
    positions p - window + 1 .. p. Computed in blocks of `window` queries, each against its own and the previous
    block's keys: O(T * window) work instead of the O(T^2) of a full causal pass, with identical results to masking
    the full T x T scores."""
    b, h, t, hd = q.shape
    pad = -t % window
    q, k, v = (F.pad(z, (0, 0, 0, pad)) for z in (q, k, v))
    n = (t + pad) // window
    q, k, v = (z.reshape(b * h, n, window, hd) for z in (q, k, v))
    k, v = (torch.cat([F.pad(z, (0, 0, 0, 0, 1, 0))[:, :-1], z], dim=2) for z in (k, v))  # (BH, n, 2w, hd)
    # positions relative to the query block's start: queries 0..w-1, keys -w..w-1 (previous block, then own)
    key = torch.arange(-window, window, device=q.device)
    mask = window_mask(key[window:], key, window)
    mask = mask & ((torch.arange(n, device=q.device) > 0)[:, None, None] | (key >= 0))  # block 0 has no previous block
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return y.reshape(b, h, n * window, hd)[:, :, :t]


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model, n_heads, window=0):
        super().__init__()
        assert d_model % n_heads == 0, "d_model must be divisible by n_heads"
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.window = window  # 0: attend to the whole prefix
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def _heads(self, x):
        b, t, _ = x.shape
        return x.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)

    def forward(self, x, cache=None, pos=0):
        """Full causal pass if cache is None; otherwise x holds the new token(s) at
        positions pos.. and their keys/values are written into cache = [k_buf, v_buf]."""
        b, t, d = x.shape
        q, k, v = (self._heads(z) for z in self.qkv(x).split(d, dim=2))
        if cache is None and self.window:
            y = local_causal_attention(q, k, v, self.window)
        elif cache is None:
            # no attention dropout: with it, the CPU kernel falls back to the materialised 2048^2 path, 10x slower
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            k_buf, v_buf = cache
            k_buf[:, :, pos:pos + t] = k
            v_buf[:, :, pos:pos + t] = v
            first = max(0, pos + 1 - self.window) if self.window else 0  # the first key the first query sees
            k, v = k_buf[:, :, first:pos + t], v_buf[:, :, first:pos + t]
            # Query pos + a sees keys first..pos + a (and, with a window, none more than window - 1 back).
            # With t == 1 (the sampling case) the slice alone is the mask.
            mask = None
            if t > 1:
                mask = window_mask(torch.arange(pos, pos + t, device=x.device),
                                   torch.arange(first, pos + t, device=x.device), self.window)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(b, t, d)
        return self.proj(y)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, d_model, n_heads, dropout, window=0):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, window)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(),
            nn.Linear(4 * d_model, d_model), nn.Dropout(dropout))
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x, cache=None, pos=0):
        x = x + self.resid_drop(self.attn(self.ln1(x), cache, pos))
        return x + self.mlp(self.ln2(x))


SCANS = ("raster", "centre_out")


def scan_rows(h, scan):
    """The order in which `scan` reads the h grid rows (each row's columns are read left to right).
    raster: 0, 1, ..., h - 1. centre_out: from the middle outwards, alternating sides: m = (h - 1) // 2, then
    m + 1, m - 1, m + 2, m - 2, ... (h = 64: 31, 32, 30, 33, ..., 62, 0, 63), so that each row's mirror partner
    h - 1 - r is read just before or just after it, and each row after the first is read after its inward
    neighbour."""
    if scan == "raster":
        return list(range(h))
    if scan == "centre_out":
        m = (h - 1) // 2
        rows = [m]
        for d in range(1, h):
            rows += [r for r in (m + d, m - d) if 0 <= r < h]
        return rows
    raise ValueError(f"scan={scan!r}: expected one of {SCANS}")


def scan_tables(grid, scan, mirror):
    """-> order (T,): the flat spatial index (r * w + c) read at each sequence position t; and neighbours
    (T, 3 + mirror): the sequence positions of each position's neighbour inputs, T where there is none.

    The neighbour inputs are the codes at columns c - 1, c, c + 1 of the spatially adjacent row that was read
    before row r (under raster the row above; under centre_out the inward neighbour; none for the first row read)
    and, with `mirror`, the code at (h - 1 - r, c) if it was read before t. Every entry is < t or T: causal."""
    h, w = grid
    rows = scan_rows(h, scan)
    rank = {r: i for i, r in enumerate(rows)}  # when each row is read
    order = torch.tensor([r * w + c for r in rows for c in range(w)])
    seq_of = torch.empty_like(order)
    seq_of[order] = torch.arange(h * w)
    neighbours = torch.full((h * w, 3 + mirror), h * w)
    for t, s in enumerate(order.tolist()):
        r, c = divmod(s, w)
        earlier = [a for a in (r - 1, r + 1) if 0 <= a < h and rank[a] < rank[r]]
        assert len(earlier) <= 1, "a scan reads each row after at most one of its two adjacent rows"
        for a in earlier:
            for k, cc in enumerate((c - 1, c, c + 1)):
                if 0 <= cc < w:
                    neighbours[t, k] = seq_of[a * w + cc]
        if mirror and seq_of[(h - 1 - r) * w + c] < t:
            neighbours[t, 3] = seq_of[(h - 1 - r) * w + c]
    assert bool(((neighbours < torch.arange(h * w)[:, None]) | (neighbours == h * w)).all())
    return order, neighbours


class CodePrior(nn.Module):
    """Autoregressive transformer over a (h, w) grid of code indices, read row by row in the order `scan` gives
    (scan_rows), each row left to right, after a start token.

    Each position's input is the previous code in reading order (the one to its left, except at a row's start),
    the three codes of the spatially adjacent row already read (above-left, above, above-right under raster) and
    its row and column; with `mirror_input` (default: on under centre_out) also the code at the mirrored row
    h - 1 - r, same column, if already read. start_token stands for any neighbour off the grid or not yet read.
    Handed its 2D neighbours, the model need not first learn to attend 31-33 steps back: fewer bits per code at
    equal training time (README, Generation). With window > 0 each position attends only to the `window`
    positions up to itself, which makes training O(T * window) instead of O(T^2); the last `n_global_layers`
    blocks attend to the whole prefix regardless.

    Layouts: forward(codes) and sample() use grids in spatial layout, (B, h, w) (forward also takes them
    flattened, (B, h * w)); the scan is internal. logits(), forward_tokens() and known_codes() work in sequence
    (reading) order, which under raster is the flattened grid; to_sequence() and to_grid() convert."""

    def __init__(self, n_codes, grid=(64, 32), d_model=128, n_layers=4, n_heads=4, dropout=0.0, window=0,
                 n_global_layers=0, scan="centre_out", mirror_input=None):
        super().__init__()
        if scan not in SCANS:
            raise ValueError(f"scan={scan!r}: expected one of {SCANS}")
        if not 0 <= n_global_layers <= n_layers:
            raise ValueError(f"n_global_layers={n_global_layers}: expected 0 to n_layers={n_layers}")
        self.n_codes = n_codes
        self.grid = tuple(grid)
        self.seq_len = grid[0] * grid[1]
        self.scan = scan
        self.n_global_layers = n_global_layers
        self.mirror_input = scan == "centre_out" if mirror_input is None else bool(mirror_input)
        order, neighbours = scan_tables(self.grid, scan, self.mirror_input)
        # derived from the arguments, so not saved
        self.register_buffer("order", order, persistent=False)  # sequence position -> flat spatial index
        self.register_buffer("inverse", torch.argsort(order), persistent=False)  # flat spatial index -> position
        self.register_buffer("neighbour_index", neighbours, persistent=False)
        self.start_token = n_codes  # extra embedding row: the start, and any neighbour off the grid; never predicted
        self.tok_emb = nn.Embedding(n_codes + 1, d_model)
        # one table, offset per neighbour input (3, or 4 with the mirror); named for the raster scan's row above
        self.above_emb = nn.Embedding(neighbours.shape[1] * (n_codes + 1), d_model)
        self.row_emb = nn.Embedding(grid[0], d_model)
        self.col_emb = nn.Embedding(grid[1], d_model)
        self.drop = nn.Dropout(dropout)
        windows = [window if i < n_layers - n_global_layers else 0 for i in range(n_layers)]
        self.blocks = nn.ModuleList(Block(d_model, n_heads, dropout, wi) for wi in windows)
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, n_codes)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        # Small GPT-style init keeps initial logits near uniform (loss ~ ln n_codes).
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def to_sequence(self, codes):
        """Grids in spatial layout, (B, h, w) or (B, h * w) -> (B, h * w) in reading order."""
        flat = codes.reshape(codes.shape[0], -1)
        assert flat.shape[1] == self.seq_len, "expected whole grids"
        return flat if self.scan == "raster" else flat[:, self.order]

    def to_grid(self, seq):
        """(B, h * w, ...) in reading order -> (B, h, w, ...) in spatial layout."""
        if self.scan != "raster":
            seq = seq[:, self.inverse]
        return seq.reshape(seq.shape[0], *self.grid, *seq.shape[2:])

    def neighbours(self, known, positions):
        """known (B, T + 1) from known_codes, positions (L,) -> (B, L, 3 or 4) indices into above_emb of each
        position's neighbour inputs (start_token where off the grid or not yet read)."""
        index = self.neighbour_index[positions]
        offsets = torch.arange(index.shape[1], device=known.device) * (self.n_codes + 1)
        return known[:, index] + offsets

    def forward_tokens(self, tokens, known, caches=None, pos=0):
        """tokens (B, L): the inputs at sequence positions pos..pos+L-1 (the start token, then each previous code);
        known (B, T + 1) from known_codes -> logits (B, L, n_codes)."""
        positions = torch.arange(pos, pos + tokens.shape[1], device=tokens.device)
        spatial = self.order[positions]
        x = (self.tok_emb(tokens) + self.above_emb(self.neighbours(known, positions)).sum(2)
             + self.row_emb(spatial // self.grid[1]) + self.col_emb(spatial % self.grid[1]))
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, None if caches is None else caches[i], pos)
        return self.head(self.ln_f(x))

    def with_start(self, idx):
        start = torch.full_like(idx[:, :1], self.start_token)
        return torch.cat([start, idx[:, :-1]], dim=1)  # shift right: output t sees idx[:, :t]

    def known_codes(self, idx):
        """idx (B, L <= T) in reading order -> (B, T + 1): idx, then start_token (beyond L, and in the last slot,
        which neighbour_index names for 'no neighbour'). Sampling fills it in place as codes are drawn."""
        known = torch.full((idx.shape[0], self.seq_len + 1), self.start_token, dtype=idx.dtype, device=idx.device)
        known[:, :idx.shape[1]] = idx
        return known

    def logits(self, idx):
        """idx (B, L <= h*w) codes in reading order -> (B, L, n_codes); position t predicts idx[:, t] from
        idx[:, :t]. Under raster the reading order is the flattened grid."""
        assert idx.shape[1] <= self.seq_len, "sequence longer than the grid"
        return self.forward_tokens(self.with_start(idx), self.known_codes(idx))

    def forward(self, codes):
        """codes (B, h, w) -> mean cross-entropy in nats per code (the training loss; DDP wraps this)."""
        idx = self.to_sequence(codes)
        return F.cross_entropy(self.logits(idx).reshape(-1, self.n_codes).float(), idx.reshape(-1))

    def new_caches(self, n, device, dtype):
        caches = []
        for block in self.blocks:
            a = block.attn
            shape = (n, a.n_heads, self.seq_len, a.head_dim)
            caches.append([torch.zeros(shape, device=device, dtype=dtype),
                           torch.zeros(shape, device=device, dtype=dtype)])
        return caches

    def _draw(self, logits, temperature, top_k, generator):
        logits = logits / temperature
        if top_k:
            kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        return torch.multinomial(probs, 1, generator=generator)  # (n, 1)

    @torch.no_grad()
    def sample(self, n, temperature=1.0, top_k=0, generator=None, use_cache=True, device=None):
        """Draw n grids -> (n, h, w) long, in spatial layout. Both paths consume identical random draws
        (one multinomial on (n, n_codes) probabilities per position, in reading order), so they agree
        for the same generator state up to float rounding of the logits."""
        device = device if device is not None else next(self.parameters()).device
        tokens = torch.full((n, 1), self.start_token, dtype=torch.long, device=device)
        known = self.known_codes(tokens[:, :0])
        caches = None
        if use_cache:
            # Buffer dtype follows the attention projections' output (e.g. bf16 under autocast).
            probe = self.blocks[0].attn.qkv(self.tok_emb(tokens[:, :1]))
            caches = self.new_caches(n, device, probe.dtype)
        for t in range(self.seq_len):
            if use_cache:
                logits = self.forward_tokens(tokens[:, t:t + 1], known, caches, pos=t)[:, -1]
            else:
                logits = self.forward_tokens(tokens, known)[:, -1]  # recompute the whole prefix
            code = self._draw(logits, temperature, top_k, generator)
            known[:, t] = code[:, 0]
            tokens = torch.cat([tokens, code], dim=1)
        return self.to_grid(tokens[:, 1:])


@torch.no_grad()
def reconstruct(model, x, device, batch_size=64):
    """x float32 (N, H, W) in [0, 1] (numpy) -> reconstructions (N, H, W) numpy, unclipped, and codes (N, h, w)."""
    recs, codes, device = [], [], torch.device(device)
    for i in range(0, len(x), batch_size):
        xb = torch.as_tensor(x[i:i + batch_size], device=device)[:, None]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            xh, _, idx = model(xb)
        recs.append(xh.float()[:, 0].cpu().numpy())
        codes.append(idx.cpu().numpy())
    return np.concatenate(recs), np.concatenate(codes)
