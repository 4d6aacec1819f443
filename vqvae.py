"""The VQ-VAE of van den Oord et al. 2017, "Neural Discrete Representation Learning", as its Figure 1 draws it.

    x -> Encoder -> z_e(x) -> VectorQuantizer: the nearest of n_embeddings codebook vectors e_k -> z_q(x) -> Decoder

A 256x128 slice becomes a grid of indices into the codebook: 64x32 with n_down=2, 32x16 with 3, 16x8 with 4. The
loss (eq. 3) is the reconstruction term, passed straight through the quantiser to the encoder, plus the commitment
term beta * ||z_e(x) - sg[e]||^2; the codebook itself follows exponential moving averages of the encoder outputs
assigned to it (the paper's appendix A.1), not a gradient. in_channels and out_channels let the same model encode a
one-hot organ map (6 in, 6 logits out) as well as a slice (1 in, 1 out).

    model = VQVAE()
    x_hat, commitment, codes = model(x)   # training: x (N, in_channels, H, W)
    codes = model.encode(x)               # (N, h, w) indices
    x_hat = model.decode(codes)           # (N, out_channels, H, W)
"""
from collections import OrderedDict

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
    """(N, in_channels, H, W) -> (N, embedding_dim, H / 2^n_down, W / 2^n_down): n_down stride-2 convolutions, then
    residual layers."""

    def __init__(self, n_hiddens, n_residual_hiddens, n_residual_layers, embedding_dim, n_down=2, in_channels=1):
        super().__init__()
        widths = [in_channels, n_hiddens // 2] + [n_hiddens] * (n_down - 1)
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
    """(N, embedding_dim, H / 2^n_down, W / 2^n_down) -> (N, out_channels, H, W), the mirror of the encoder."""

    def __init__(self, n_hiddens, n_residual_hiddens, n_residual_layers, embedding_dim, n_down=2, out_channels=1):
        super().__init__()
        widths = [n_hiddens] * (n_down - 1) + [n_hiddens // 2, out_channels]
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
        """z (N, D, h, w) -> (z_q with straight-through gradient, commitment loss, indices (N, h, w)); in training
        mode the codebook's moving averages take this batch in."""
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
                 n_embeddings=512, beta=0.25, ema_decay=0.99, n_down=2, in_channels=1, out_channels=1):
        super().__init__()
        self.encoder = Encoder(n_hiddens, n_residual_hiddens, n_residual_layers, embedding_dim, n_down, in_channels)
        self.quantizer = VectorQuantizer(n_embeddings, embedding_dim, beta, ema_decay)
        self.decoder = Decoder(n_hiddens, n_residual_hiddens, n_residual_layers, embedding_dim, n_down, out_channels)

    def forward(self, x):
        """x (N, in_channels, H, W) -> (reconstruction (N, out_channels, H, W), commitment loss, codes (N, h, w))."""
        zq, loss, idx = self.quantizer(self.encoder(x))
        return self.decoder(zq), loss, idx

    @torch.no_grad()
    def encode(self, x):
        """x (N, in_channels, H, W) -> the index of each position's nearest code (N, h, w); the codebook is left
        as it is."""
        z = self.encoder(x)
        with torch.autocast(z.device.type, enabled=False):
            flat = z.float().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
            return self.quantizer.distances(flat).argmin(1).view(z.shape[0], *z.shape[2:])

    @torch.no_grad()
    def decode(self, codes):
        """Code indices (N, h, w) -> the decoder's output (N, out_channels, H, W)."""
        return self.decoder(self.quantizer.lookup(codes))
