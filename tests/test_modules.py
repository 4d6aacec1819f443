import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

import checkpoints
from metrics import box_mean, psnr_torch, score, ssim_matrix, ssim_torch
from vqvae import VQVAE, VectorQuantizer, code_counts


def test_model_shapes_and_grid():
    m = VQVAE(n_hiddens=16, n_residual_hiddens=8, n_residual_layers=2, embedding_dim=8, n_embeddings=32)
    x = torch.rand(2, 1, 256, 128)
    xh, loss, idx = m(x)
    assert xh.shape == x.shape and idx.shape == (2, 64, 32) and loss.ndim == 0
    assert m.decode(m.eval()(x)[2]).shape == x.shape


def test_residual_layers_have_their_own_weights():
    m = VQVAE(n_residual_layers=3)
    layers = m.encoder.net.residual.layers
    assert len({id(l.block[1].weight) for l in layers}) == 3


def test_straight_through_gradient_and_commitment_term():
    torch.manual_seed(0)
    q = VectorQuantizer(16, 4, beta=0.25)
    q.train()
    z0 = torch.randn(2, 4, 3, 3)
    q(z0)  # first call initialises the codebook from data
    q.eval()
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    zq, loss, idx = q(z)
    e = q.embedding[idx].permute(0, 3, 1, 2)
    # zq = z + (e - z): equal to e up to float rounding of the straight-through sum
    assert torch.allclose(zq, e, atol=1e-6) and torch.allclose(loss, 0.25 * F.mse_loss(z, e))
    g = torch.randn_like(zq)
    (zq * g).sum().backward()
    assert torch.allclose(z.grad, g)  # straight-through: the decoder's gradient reaches z unchanged
    z.grad = None
    loss.backward()
    assert torch.allclose(z.grad, 0.25 * 2 * (z - e).detach() / z.numel())  # beta weights the commitment term


def test_nearest_code_and_ema_update():
    q = VectorQuantizer(2, 2, decay=0.5, dead_threshold=0.0)
    q.embedding.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
    q.cluster_size.fill_(1.0)
    q.embed_sum.copy_(q.embedding)
    z = torch.tensor([[1.0, 1.0], [9.0, 9.0], [11.0, 11.0]]).view(1, 3, 1, 2).permute(0, 3, 1, 2)
    q.train()
    _, _, idx = q(z)
    assert idx.flatten().tolist() == [0, 1, 1]
    # cluster_size = 0.5*1 + 0.5*count, embed_sum = 0.5*old + 0.5*sum
    assert torch.allclose(q.cluster_size, torch.tensor([1.0, 1.5]))
    n = 2.5
    smoothed = (q.cluster_size + q.eps) / (n + 2 * q.eps) * n
    expect = torch.tensor([[0.5, 0.5], [15.0, 15.0]]) / smoothed[:, None]
    assert torch.allclose(q.embedding, expect, atol=1e-4)


def test_dead_code_is_revived_on_data():
    torch.manual_seed(0)
    q = VectorQuantizer(8, 2, decay=0.9, dead_threshold=1.0)
    z = torch.randn(4, 2, 8, 8) + 100.0  # data far from zero
    q.train()
    q(z)
    assert torch.all(q.embedding.abs() > 50)  # all codes start dead, so they are placed on data
    q.embedding[3] = -1000.0  # a code nobody will choose
    q.embed_sum[3] = -1000.0 * q.cluster_size[3]
    for _ in range(60):
        q(z)
    assert q.embedding[3].min() > 50 and q.cluster_size.min() >= 1.0


def test_quantizer_distances_stay_fp32_under_autocast():
    q = VectorQuantizer(16, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        zq, loss, _ = q.train()(torch.randn(2, 4, 3, 3).bfloat16())
    assert zq.dtype == torch.float32 and q.embedding.dtype == torch.float32


@pytest.mark.parametrize("shape", [(40, 33), (256, 128)])
def test_ssim_torch_matches_scikit_image(shape):
    rng = np.random.default_rng(0)
    x = rng.random((5, *shape))
    x[:, :shape[0] // 4] = 0  # a black background band, as around the body in a slice
    y = np.clip(x + rng.normal(0, 0.1, x.shape), 0, 1)
    y[0] = rng.random(shape)
    t = ssim_torch(torch.tensor(x)[:, None], torch.tensor(y)[:, None]).double().numpy()
    ref = [structural_similarity(a, b, data_range=1.0) for a, b in zip(x, y)]
    assert np.abs(t - ref).max() < 1e-4
    assert ssim_torch(torch.tensor(x)[:, None], torch.tensor(x)[:, None]).min() > 1 - 1e-5  # identical: exactly 1
    p = psnr_torch(torch.tensor(x)[:, None], torch.tensor(y)[:, None])
    assert np.allclose(p.numpy(), [peak_signal_noise_ratio(a, b, data_range=1.0) for a, b in zip(x, y)], atol=1e-3)


def test_box_mean_equals_average_pool():
    x = torch.rand(3, 1, 256, 128)
    x[:, :, 100:] = 0
    assert (box_mean(x, 7) - F.avg_pool2d(x, 7, stride=1)).abs().max() < 1e-5


def test_ssim_matrix_is_every_pair_scikit_image():
    rng = np.random.default_rng(1)
    a, b = rng.random((5, 32, 16)), rng.random((7, 32, 16))
    b[:3] = np.clip(a[:3] + rng.normal(0, 0.1, a[:3].shape), 0, 1)  # some pairs alike, most not
    m = ssim_matrix(torch.tensor(a)[:, None].float(), torch.tensor(b)[:, None].float(), chunk=3).double().numpy()
    ref = [[structural_similarity(x, y, data_range=1.0) for y in b] for x in a]
    assert m.shape == (5, 7) and np.abs(m - ref).max() < 1e-4


@pytest.mark.filterwarnings("ignore:divide by zero")  # identical slices: scikit-image's PSNR is inf
def test_score_uses_ground_truth_range():
    gt = np.linspace(100, 500, 64 * 64).reshape(64, 64)
    assert score(gt, gt)["ssim"] == 1.0
    assert score(gt, gt * 3)["ssim"] < 0.9  # out of range values are clipped, not rescaled


def test_checkpoint_round_trip(tmp_path):
    args = dict(n_hiddens=16, n_residual_hiddens=8, n_residual_layers=1, embedding_dim=8, n_embeddings=32,
                beta=0.25, ema_decay=0.99)
    m = VQVAE(**args)
    m.train()(torch.rand(2, 1, 256, 128))  # gives the codebook buffers values
    checkpoints.save_model(tmp_path / "c.pt", "vqvae", m, args, config={}, epoch=3, val_ssim=0.5, score=0.5,
                           data_root="", image_size=[256, 128], normalisation="")
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]
    m2, ck = checkpoints.load_model(tmp_path / "c.pt")
    x = torch.rand(1, 1, 256, 128)
    assert ck["epoch"] == 3 and ck["model_class"] == "VQVAE" and torch.equal(m.eval()(x)[0], m2(x)[0])


def test_a_checkpoint_of_format_1_is_read_as_its_kinds_class_and_others_are_refused(tmp_path):
    """Files written before checkpoints recorded a class (format 1: a kind, one class each) still load; a file of
    another format, or of a class this version does not know, is one line that says what to do."""
    import pytest

    from utils import DataError
    args = dict(n_hiddens=16, n_residual_hiddens=8, n_residual_layers=1, embedding_dim=8, n_embeddings=32)
    m = VQVAE(**args).eval()
    fields = dict(model=m.state_dict(), model_args=args, config={}, epoch=1, val_ssim=0.5, score=0.5, data_root="",
                  image_size=[256, 128], normalisation="")
    torch.save(dict(kind="vqvae", format=1, **fields), tmp_path / "old.pt")  # as format 1 wrote it
    m2, ck = checkpoints.load_model(tmp_path / "old.pt")
    x = torch.rand(1, 1, 256, 128)
    assert ck["model_class"] == "VQVAE" and torch.equal(m(x)[0], m2(x)[0])
    torch.save(dict(kind="vqvae", format=0, **fields), tmp_path / "older.pt")
    with pytest.raises(DataError, match="not a checkpoint of this version of the project.*retrain"):
        checkpoints.load(tmp_path / "older.pt")
    torch.save(dict(kind="vqvae", format=checkpoints.FORMAT, model_class="Transformer9000", **fields),
               tmp_path / "alien.pt")
    with pytest.raises(DataError, match="holds a Transformer9000, a model this version of the project does not"):
        checkpoints.load_model(tmp_path / "alien.pt")


def test_encode_gives_the_codes_of_forward_and_decode_what_forward_decodes():
    torch.manual_seed(0)
    m = VQVAE(n_hiddens=16, n_residual_hiddens=8, n_residual_layers=1, embedding_dim=8, n_embeddings=32)
    m.train()(torch.rand(4, 1, 256, 128))  # codebook from data
    m.eval()
    x = torch.rand(3, 1, 256, 128)
    before = m.quantizer.embedding.clone()
    xh, _, codes = m(x)
    assert torch.equal(m.encode(x), codes) and torch.equal(m.quantizer.embedding, before)
    assert torch.allclose(m.decode(codes), xh, atol=1e-6)
    maps = VQVAE(n_hiddens=16, n_residual_hiddens=8, n_residual_layers=1, embedding_dim=8, n_embeddings=32, n_down=4,
                 in_channels=6, out_channels=6)  # an organ map, one-hot in, logits out, on a 16x8 grid
    out, _, grid = maps(torch.rand(2, 6, 256, 128))
    assert out.shape == (2, 6, 256, 128) and grid.shape == (2, 16, 8)


def test_cuda_code_paths_run_on_cpu_bf16_channels_last():
    """The GPU step's settings (bf16 autocast, channels_last, fp32 quantiser) on the CPU: finite loss, gradients."""
    m = VQVAE(n_hiddens=16, n_residual_hiddens=8, n_residual_layers=1, embedding_dim=8, n_embeddings=32)
    m = m.to(memory_format=torch.channels_last)
    x = torch.rand(2, 1, 256, 128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        xh, commit, idx = m(x)
        loss = F.mse_loss(xh.float(), x) + commit + (1 - ssim_torch(xh.float(), x).mean())
    loss.backward()
    assert torch.isfinite(loss) and xh.dtype == torch.bfloat16 and m.quantizer.embedding.dtype == torch.float32
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_code_counts_equal_bincount():
    idx = torch.randint(0, 7, (3, 5, 4))
    for dtype in (torch.float32, torch.long):
        assert torch.equal(code_counts(idx, 10, dtype), torch.bincount(idx.flatten(), minlength=10).to(dtype))
