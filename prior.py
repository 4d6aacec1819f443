"""Priors over a VQ-VAE's code grids, behind one interface, so that training, sampling and quality control use any
of them alike (nanoGPT's model.py, with the grid read as a sequence).

Every prior is a Prior, and keeps this interface:

    prior.loss(codes, condition=None)       -> the mean cross-entropy in nats per code (the training loss; forward)
    prior.code_bits(codes, condition=None)  -> (B, h, w): the bits each code costs, given what is read before it
    prior.sample(n, condition=None, temperature=1.0, top_k=0, generator=None, given=None, heal_bits=None)
                                            -> (n, h, w) new grids

codes are (B, h, w) long tensors of a VQ-VAE's code indices. A prior of whole grids takes no condition and refuses
one in one line; a prior that takes one (takes_condition) needs it for every grid. sample draws each code from
softmax(logits / temperature) over the top_k most likely (0: all); with given grids it heals them instead (Pinaya et
al. 2022): each given code is kept unless it costs more than heal_bits, and only those are drawn afresh. Losses are
in nats; divided by ln 2 they are bits.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils import DataError


class Prior(nn.Module):
    """The interface of every prior (the module docstring); forward is the loss, which the training step calls."""
    takes_condition = False

    def forward(self, codes, condition=None):
        return self.loss(codes, condition)

    def check_condition(self, condition):
        """Refuse a condition a prior cannot take, or a missing one it needs, in one line."""
        name = type(self).__name__
        if condition is not None and not self.takes_condition:
            raise DataError(f"{name}: a prior of whole grids takes no condition")
        if condition is None and self.takes_condition:
            raise DataError(f"{name}: a conditional prior needs its condition for every grid")


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


class CodePrior(Prior):
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

    def loss(self, codes, condition=None):
        """codes (B, h, w) -> mean cross-entropy in nats per code."""
        self.check_condition(condition)
        return F.cross_entropy(self.logits(codes).reshape(-1, self.n_codes).float(), self.to_tokens(codes).reshape(-1))

    @torch.no_grad()
    def code_bits(self, codes, condition=None):
        """codes (B, h, w) -> the bits each code costs under the prior, given what is read before it (B, h, w)."""
        self.check_condition(condition)
        nats = F.cross_entropy(self.logits(codes).float().permute(0, 3, 1, 2), self.to_tokens(codes), reduction="none")
        return self.to_grid(nats) / math.log(2)

    @torch.no_grad()
    def sample(self, n, condition=None, temperature=1.0, top_k=0, generator=None, given=None, heal_bits=None):
        """Draw n grids (n, h, w): one transformer pass per patch over cached keys and values, then the patch's codes
        one after another, each from softmax(logits / temperature), over the top_k most likely if top_k > 0; with
        given grids (n, h, w), each given code is kept unless it costs more than heal_bits under the prior, given
        the codes kept or drawn before it."""
        self.check_condition(condition)
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

