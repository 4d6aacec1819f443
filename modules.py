"""The VQ-VAE (van den Oord et al. 2017): Encoder -> VectorQuantizer -> Decoder, and the prior over its codes.

A 256x128 slice becomes a 64x32 grid of indices into a codebook of n_embeddings vectors of size embedding_dim.
CodePrior models that grid autoregressively in 2x2 patches with full causal attention, so that sampled grids
decode to new slices. Its loss is in nats per code; divided by ln 2 it is bits per code.
"""
import math
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
    """(N, 1, H, W) -> (N, embedding_dim, H / 2^n_down, W / 2^n_down): n_down stride-2 convolutions, then residual
    layers."""

    def __init__(self, n_hiddens, n_residual_hiddens, n_residual_layers, embedding_dim, n_down=2):
        super().__init__()
        widths = [1, n_hiddens // 2] + [n_hiddens] * (n_down - 1)
        layers = []
        for i in range(n_down):
            layers += [(f"down{i + 1}", nn.Conv2d(widths[i], widths[i + 1], 4, stride=2, padding=1)),
                       (f"relu{i + 1}", nn.ReLU())]
        self.net = nn.Sequential(OrderedDict(
            layers + [("conv", nn.Conv2d(n_hiddens, n_hiddens, 3, padding=1)),
                      ("residual", ResidualStack(n_hiddens, n_residual_hiddens, n_residual_layers)),
                      ("project", nn.Conv2d(n_hiddens, embedding_dim, 1))]))

    def forward(self, x):
        return self.net(x)


class Decoder(nn.Module):
    """(N, embedding_dim, H / 2^n_down, W / 2^n_down) -> (N, 1, H, W), the mirror of the encoder."""

    def __init__(self, n_hiddens, n_residual_hiddens, n_residual_layers, embedding_dim, n_down=2):
        super().__init__()
        widths = [n_hiddens] * (n_down - 1) + [n_hiddens // 2, 1]
        layers = [("conv", nn.Conv2d(embedding_dim, n_hiddens, 3, padding=1)),
                  ("residual", ResidualStack(n_hiddens, n_residual_hiddens, n_residual_layers))]
        for i in range(n_down):
            layers.append((f"up{i + 1}", nn.ConvTranspose2d(widths[i], widths[i + 1], 4, stride=2, padding=1)))
            if i < n_down - 1:
                layers.append((f"relu{i + 1}", nn.ReLU()))
        self.net = nn.Sequential(OrderedDict(layers))

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

    def distances(self, flat):
        """Squared distances (M, n_embeddings) of each row of flat (M, D) to every code (fp32 in forward)."""
        e = self.embedding
        return flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e.t() + e.pow(2).sum(1)

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
            idx = self.distances(flat).argmin(1)
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
                 n_embeddings=512, beta=0.25, ema_decay=0.99, n_down=2):
        super().__init__()
        self.encoder = Encoder(n_hiddens, n_residual_hiddens, n_residual_layers, embedding_dim, n_down)
        self.quantizer = VectorQuantizer(n_embeddings, embedding_dim, beta, ema_decay)
        self.decoder = Decoder(n_hiddens, n_residual_hiddens, n_residual_layers, embedding_dim, n_down)

    def forward(self, x):
        """x (N, 1, H, W) in [0, 1] -> (reconstruction, commitment loss, code indices (N, H/4, W/4))."""
        zq, loss, idx = self.quantizer(self.encoder(x))
        return self.decoder(zq), loss, idx

    @torch.no_grad()
    def decode(self, idx):
        return self.decoder(self.quantizer.lookup(idx))


# ---- the prior over code grids ----------------------------------------------------------------------------------

def centre_out(h):
    """Rows 0..h-1 from the middle outwards, alternating sides: m = (h - 1) // 2, m + 1, m - 1, m + 2, ... (h = 32:
    15, 16, 14, 17, ..., 0, 31), so that each row's mirror image h - 1 - r is read just before or just after it,
    and every row after the first just after the row beside it towards the middle."""
    m = (h - 1) // 2
    rows = [m]
    for d in range(1, h):
        rows += [r for r in (m + d, m - d) if 0 <= r < h]
    return rows


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model, n_heads):
        super().__init__()
        assert d_model % n_heads == 0, "d_model must be divisible by n_heads"
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x, cache=None, pos=0):
        """Causal attention over x (B, T, d); with cache = [keys, values] of earlier positions, x holds the token(s)
        at positions pos.., which attend to everything up to themselves (sampling, one token at a time)."""
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.n_heads, self.head_dim).transpose(1, 2) for z in self.qkv(x).split(d, dim=2))
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            cache[0][:, :, pos:pos + t], cache[1][:, :, pos:pos + t] = k, v
            y = F.scaled_dot_product_attention(q, cache[0][:, :, :pos + t], cache[1][:, :, :pos + t],
                                               is_causal=t > 1)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, d_model, n_heads, dropout):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model),
                                 nn.Dropout(dropout))
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x, cache=None, pos=0):
        x = x + self.resid_drop(self.attn(self.ln1(x), cache, pos))
        return x + self.mlp(self.ln2(x))


class CodePrior(nn.Module):
    """Autoregressive transformer over a VQ-VAE's (h, w) code grid, read in patch x patch blocks of codes, one token
    each (a 64x32 grid in 2x2 patches: 512 tokens), with full causal attention: each patch sees every patch read
    before it, so the whole slice is in view.

    Patch rows are read centre-out (centre_out), each row's patches in order, so that a structure and its mirror
    image are read one after the other. A token's input is the codes of the previous patch, those of the patch in
    the adjacent row read before (inwards) and of the mirrored patch if already read, and its patch row and column.
    The patch's own codes are then predicted one after another, each from the transformer's output and the codes
    of the patch drawn before it: p(c) = prod_t prod_j p(c_tj | c_t,<j, c_<t). The loss is in nats per code.
    """

    def __init__(self, n_codes, grid=(64, 32), patch=2, d_model=128, n_layers=4, n_heads=4, dropout=0.0):
        super().__init__()
        if grid[0] % patch or grid[1] % patch:
            raise ValueError(f"patch={patch}: must divide the code grid {tuple(grid)}")
        self.n_codes, self.grid, self.patch = n_codes, tuple(grid), patch
        self.rows, self.cols, self.per_patch = grid[0] // patch, grid[1] // patch, patch * patch
        self.n_tokens = self.rows * self.cols
        order, neighbours = self.reading_order()
        self.register_buffer("order", order, persistent=False)  # reading position -> patch index (row-major)
        self.register_buffer("neighbours", neighbours, persistent=False)
        self.start = n_codes  # the code of "no patch": before the first, off the grid, or not yet read
        vocab = n_codes + 1
        self.register_buffer("slot", torch.arange(self.per_patch) * vocab, persistent=False)  # code j of a patch
        self.register_buffer("neighbour_slot", torch.arange(2)[:, None] * vocab * self.per_patch + self.slot,
                             persistent=False)  # code j of the inward (0) or the mirrored (1) patch
        self.code_emb = nn.Embedding(vocab * self.per_patch, d_model)  # the previous patch's codes
        self.neighbour_emb = nn.Embedding(2 * vocab * self.per_patch, d_model)  # the inward and mirrored patches'
        self.row_emb, self.col_emb = nn.Embedding(self.rows, d_model), nn.Embedding(self.cols, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, dropout) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.drawn_emb = nn.Embedding(n_codes * self.per_patch, d_model)  # this patch's codes drawn so far
        self.head_ln = nn.LayerNorm(d_model)
        self.heads = nn.ModuleList(nn.Linear(d_model, n_codes) for _ in range(self.per_patch))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        # small GPT-style init keeps the first logits near uniform (loss ~ ln n_codes)
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def reading_order(self):
        """-> order (T,): the patch (row-major index) read at each position; neighbours (T, 2): the positions of
        the patch in the adjacent row read before (same column) and of the mirrored patch if read before, T where
        there is none. Every entry is < its own position: causal."""
        rows = centre_out(self.rows)
        read = {r: i for i, r in enumerate(rows)}
        order = torch.tensor([r * self.cols + c for r in rows for c in range(self.cols)])
        position = torch.argsort(order)
        neighbours = torch.full((self.n_tokens, 2), self.n_tokens)
        for t, s in enumerate(order.tolist()):
            r, c = divmod(s, self.cols)
            for a in (r - 1, r + 1):
                if 0 <= a < self.rows and read[a] < read[r]:
                    neighbours[t, 0] = position[a * self.cols + c]
            mirror = position[(self.rows - 1 - r) * self.cols + c]
            neighbours[t, 1] = mirror if mirror < t else self.n_tokens
        return order, neighbours

    def to_tokens(self, codes):
        """Grids (B, h, w) -> (B, T, patch * patch): each patch's codes, patches in reading order."""
        b, p = codes.shape[0], self.patch
        t = codes.reshape(b, self.rows, p, self.cols, p).permute(0, 1, 3, 2, 4).reshape(b, self.n_tokens, p * p)
        return t[:, self.order]

    def to_grid(self, tokens):
        """The inverse of to_tokens."""
        b, p = tokens.shape[0], self.patch
        t = torch.empty_like(tokens)
        t[:, self.order] = tokens
        return t.reshape(b, self.rows, self.cols, p, p).permute(0, 1, 3, 2, 4).reshape(b, *self.grid)

    def inputs(self, tokens, positions):
        """tokens (B, T, pp), start where not yet drawn -> the inputs (B, L, d) at positions (L,), from patches
        read before each position only."""
        none = torch.full_like(tokens[:, :1], self.start)
        previous = torch.cat([none, tokens], 1)[:, positions]  # the patch read just before
        around = torch.cat([tokens, none], 1)[:, self.neighbours[positions]]  # (B, L, 2, pp)
        patch = self.order[positions]
        return (self.code_emb(previous + self.slot).sum(2)
                + self.neighbour_emb(around + self.neighbour_slot).sum((2, 3))
                + self.row_emb(patch // self.cols) + self.col_emb(patch % self.cols))

    def head(self, h, j, drawn):
        """Logits of code j of a patch from the transformer's output h and drawn, the sum of the embeddings of its
        codes 0..j-1."""
        return self.heads[j](self.head_ln(h + drawn))

    def logits(self, codes):
        """codes (B, h, w) -> (B, T, pp, n_codes): each code's prediction from what is read before it (teacher
        forcing), patches in reading order."""
        tokens = self.to_tokens(codes)
        x = self.drop(self.inputs(tokens, torch.arange(self.n_tokens, device=codes.device)))
        for block in self.blocks:
            x = block(x)
        h, drawn, out = self.ln_f(x), 0, []
        for j in range(self.per_patch):
            out.append(self.head(h, j, drawn))
            drawn = drawn + self.drawn_emb(tokens[..., j] + j * self.n_codes)
        return torch.stack(out, 2)

    def forward(self, codes):
        """codes (B, h, w) -> mean cross-entropy in nats per code (the training loss; DDP wraps this)."""
        return F.cross_entropy(self.logits(codes).reshape(-1, self.n_codes).float(), self.to_tokens(codes).reshape(-1))

    @torch.no_grad()
    def code_bits(self, codes):
        """codes (B, h, w) -> the bits each code costs under the prior, given what is read before it (B, h, w)."""
        nats = F.cross_entropy(self.logits(codes).float().permute(0, 3, 1, 2), self.to_tokens(codes), reduction="none")
        return self.to_grid(nats) / math.log(2)

    @torch.no_grad()
    def sample(self, n, temperature=1.0, top_k=0, generator=None, given=None, heal_bits=None):
        """Draw n grids (n, h, w): one transformer pass per patch over cached keys and values, then the patch's codes
        one after another, each from softmax(logits / temperature), over the top_k most likely if top_k > 0.
        Healing (Pinaya et al. 2022): with given grids (n, h, w), each given code is kept unless it costs more than
        heal_bits under the prior, given the codes kept or drawn before it; only those are drawn afresh."""
        dev = self.row_emb.weight.device
        given = None if given is None else self.to_tokens(given)
        tokens = torch.full((n, self.n_tokens, self.per_patch), self.start, dtype=torch.long, device=dev)
        caches = None
        for t in range(self.n_tokens):
            x = self.inputs(tokens, torch.tensor([t], device=dev))
            if caches is None:  # buffers in the attention's dtype (bf16 under autocast)
                dtype, shape = self.blocks[0].attn.qkv(x).dtype, (n, self.blocks[0].attn.n_heads, self.n_tokens,
                                                                  self.blocks[0].attn.head_dim)
                caches = [[torch.zeros(shape, dtype=dtype, device=dev) for _ in range(2)] for _ in self.blocks]
            for block, cache in zip(self.blocks, caches):
                x = block(x, cache, t)
            h, drawn = self.ln_f(x)[:, 0], 0
            for j in range(self.per_patch):
                logits = self.head(h, j, drawn).float()
                code = draw_code(logits, temperature, top_k, generator)
                if given is not None:
                    nats = F.cross_entropy(logits, given[:, t, j], reduction="none")
                    code = torch.where(nats <= heal_bits * math.log(2), given[:, t, j], code)
                tokens[:, t, j] = code
                drawn = drawn + self.drawn_emb(code + j * self.n_codes)
        return self.to_grid(tokens)


def draw_code(logits, temperature=1.0, top_k=0, generator=None):
    """One code per row of logits (n, n_codes), from softmax(logits / temperature) over the top_k most likely."""
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)[:, 0]


@torch.no_grad()
def reconstruct(model, x, device, batch_size=64, amp=False, decode=True):
    """x float32 (N, H, W) in [0, 1] (numpy) -> reconstructions (N, H, W) numpy, unclipped (None without decode),
    and codes (N, h, w); with amp, under bf16 autocast (as in training on the GPU path)."""
    recs, codes, device = [], [], torch.device(device)
    for i in range(0, len(x), batch_size):
        xb = torch.as_tensor(x[i:i + batch_size], device=device)[:, None]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            zq, _, idx = model.quantizer(model.encoder(xb))
            if decode:
                recs.append(model.decoder(zq).float()[:, 0].cpu().numpy())
        codes.append(idx.cpu().numpy())
    return np.concatenate(recs) if decode else None, np.concatenate(codes)
