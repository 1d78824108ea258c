"""study.losses: least squares, cIMLE selection and gradients, masks, argument errors, Gaussian KL."""

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from study.losses import cimle, gaussian_kl, least_squares

B, N, D, DZ = 5, 3, 4, 2


def linear_predict(weight, bias):
    """predict(z) = z @ W + b reshaped to [B, N, D]: parameters whose gradient is easy to trace."""
    return lambda z: (z @ weight + bias).reshape(z.shape[0], N, D)  # z [B, DZ] -> [B, N, D]


@pytest.fixture
def problem():
    torch.manual_seed(0)
    weight = torch.randn(DZ, N * D, requires_grad=True)
    bias = torch.randn(N * D, requires_grad=True)
    target = torch.randn(B, N, D)
    return weight, bias, target


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_least_squares_is_mean_per_element():
    pred, target = torch.zeros(2, 3), torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 2.0]])
    assert least_squares(pred, target).item() == pytest.approx((1 + 4 + 9 + 4) / 6)


def test_cimle_with_k1_is_least_squares_at_the_drawn_noise(problem):
    weight, bias, target = problem
    predict = linear_predict(weight, bias)
    res = cimle(predict, target, k=1, noise_shape=DZ, generator=gen(3))
    drawn = torch.randn((1, B, DZ), generator=gen(3))[0]  # cimle draws (k, B, *noise_shape) from the generator
    torch.testing.assert_close(res.z, drawn)
    assert torch.all(res.index == 0)
    torch.testing.assert_close(res.loss, least_squares(predict(drawn), target))


def test_chosen_sample_is_the_row_minimum(problem):
    weight, bias, target = problem
    predict = linear_predict(weight, bias)
    mask = torch.tensor([[1, 0, 1]] * B)
    res = cimle(predict, target, k=7, noise_shape=DZ, mask=mask, generator=gen())
    assert res.distances.shape == (B, 7) and not res.distances.requires_grad
    rows = torch.arange(B)
    torch.testing.assert_close(res.distances[rows, res.index], res.distances.min(dim=1).values)
    # the distance of each sample really is its masked squared error
    noise = torch.randn((7, B, DZ), generator=gen())
    torch.testing.assert_close(res.z, noise[res.index, rows])
    for j in range(7):
        err = (predict(noise[j]) - target).pow(2).mean(-1)  # [B, N]
        expected = (err * mask).sum(1) / mask.sum(1)
        torch.testing.assert_close(res.distances[:, j], expected.detach())
    torch.testing.assert_close(res.loss, least_squares(predict(res.z), target, mask))


def test_gradient_flows_only_through_the_chosen_sample(problem):
    weight, bias, target = problem
    res = cimle(linear_predict(weight, bias), target, k=6, noise_shape=DZ, generator=gen(1))
    got = torch.autograd.grad(res.loss, [weight, bias])
    ref_loss = least_squares(linear_predict(weight, bias)(res.z.detach()), target)
    want = torch.autograd.grad(ref_loss, [weight, bias])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    # with W's gradient z^T (dL/dpred), only the chosen rows of noise can appear in it
    assert res.z.requires_grad is False


@pytest.mark.parametrize("chunk,vectorize", [(1, True), (3, True), (None, False), (2, False)])
def test_chunking_and_vectorize_do_not_change_the_result(problem, chunk, vectorize):
    weight, bias, target = problem
    predict = linear_predict(weight, bias)
    ref = cimle(predict, target, k=5, noise_shape=DZ, generator=gen(2))
    res = cimle(predict, target, k=5, noise_shape=DZ, generator=gen(2), chunk=chunk, vectorize=vectorize)
    assert torch.equal(res.index, ref.index)
    torch.testing.assert_close(res.distances, ref.distances)
    torch.testing.assert_close(res.z, ref.z)
    torch.testing.assert_close(res.loss, ref.loss)


def test_same_seed_same_result_other_seed_differs(problem):
    weight, bias, target = problem
    predict = linear_predict(weight, bias)
    a = cimle(predict, target, k=4, noise_shape=DZ, generator=gen(5))
    b = cimle(predict, target, k=4, noise_shape=DZ, generator=gen(5))
    c = cimle(predict, target, k=4, noise_shape=DZ, generator=gen(6))
    assert torch.equal(a.z, b.z) and torch.equal(a.distances, b.distances) and a.loss.item() == b.loss.item()
    assert not torch.equal(a.z, c.z)


def test_mask_weights_the_right_elements():
    # target [B=2, N=3, D=2]; errors per element chosen by hand
    target = torch.zeros(2, 3, 2)
    pred = torch.tensor([[[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]],
                         [[0.0, 2.0], [4.0, 0.0], [1.0, 1.0]]])
    mask = torch.tensor([[1, 0, 1], [0, 1, 0]])  # [B, N]
    # selected positions: (0,0): 1,1 ; (0,2): 9,9 ; (1,1): 16,0  -> 36 / 6 elements
    assert least_squares(pred, target, mask).item() == pytest.approx(36 / 6)
    assert least_squares(pred, target, mask.bool()).item() == pytest.approx(36 / 6)
    # a full-shape mask [B, N, D] selects single elements
    full = torch.zeros(2, 3, 2)
    full[1, 1, 0] = 1
    assert least_squares(pred, target, full).item() == pytest.approx(16.0)
    # cimle distances use the same per-example masking: row 0 -> (2 + 18)/4, row 1 -> 16/2
    res = cimle(lambda z: pred + 0 * z.sum(-1)[:, None, None], target, k=2, noise_shape=1, mask=mask,
                generator=gen())
    torch.testing.assert_close(res.distances, torch.tensor([[5.0, 5.0], [8.0, 8.0]]))


def test_bad_arguments_raise_clear_errors(problem):
    weight, bias, target = problem
    predict = linear_predict(weight, bias)
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        cimle(predict, target, k=0, noise_shape=DZ)
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        cimle(predict, target, k=2.0, noise_shape=DZ)
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        cimle(predict, target, k=True, noise_shape=DZ)
    with pytest.raises(ValueError, match="chunk must be None or an int >= 1"):
        cimle(predict, target, k=2, noise_shape=DZ, chunk=0)
    with pytest.raises(ValueError, match="noise_shape must be positive ints"):
        cimle(predict, target, k=2, noise_shape=0)
    with pytest.raises(ValueError, match=r"predict\(z\) returned shape \(5, 12\), expected target shape \(5, 3, 4\)"):
        cimle(lambda z: z @ weight + bias, target, k=2, noise_shape=DZ)
    with pytest.raises(ValueError, match=r"mask shape \(5, 4\) does not match the leading dims"):
        cimle(predict, target, k=2, noise_shape=DZ, mask=torch.ones(B, 4))
    with pytest.raises(ValueError, match=r"mask has shape \(5, 3, 4, 1\) but must cover the leading dims"):
        least_squares(target, target, torch.ones(B, N, D, 1))
    with pytest.raises(ValueError, match=r"prediction shape \(5, 3\) does not match target shape \(5, 3, 4\)"):
        least_squares(torch.zeros(B, N), target)
    with pytest.raises(ValueError, match="mask selects no element"):
        least_squares(target, target, torch.zeros(B, N))


def test_gaussian_kl_matches_torch_distributions():
    torch.manual_seed(0)
    mu, logvar = torch.randn(4, 3, 5), torch.randn(4, 3, 5)
    ref = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0)).sum(-1)  # [4, 3]
    torch.testing.assert_close(gaussian_kl(mu, logvar), ref.mean())
    mask = torch.tensor([[1, 0, 1]] * 4)
    torch.testing.assert_close(gaussian_kl(mu, logvar, mask), ref[:, [0, 2]].mean())
    # closed form in one dimension: KL(N(1, e) || N(0, 1)) = (1 + e - 1 - 1) / 2
    torch.testing.assert_close(gaussian_kl(torch.ones(1, 1), torch.ones(1, 1)), torch.tensor((torch.e - 1) / 2))
    with pytest.raises(ValueError, match="mu shape .* and logvar shape .* differ"):
        gaussian_kl(mu, logvar[..., :2])
    # the Masked VAE's scale: the mean over every latent feature of every position
    per_feature = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0))  # [4, 3, 5]
    torch.testing.assert_close(gaussian_kl(mu, logvar, features="mean"), per_feature.mean())
    torch.testing.assert_close(gaussian_kl(mu, logvar, mask, features="mean"), per_feature[:, [0, 2]].mean())
    with pytest.raises(ValueError, match="features must be"):
        gaussian_kl(mu, logvar, features="max")




# --------------------------------------------------------------------------- per-token (factorised) selection


def tokenwise_predict(weight, bias):
    """predict(z [B, N, DZ]) = z @ W + b per position: position j depends on noise row j only."""
    return lambda z: z @ weight + bias  # [B, N, D]


@pytest.fixture
def token_problem():
    torch.manual_seed(1)
    weight = torch.randn(DZ, D, requires_grad=True)
    bias = torch.randn(D, requires_grad=True)
    target = torch.randn(B, N, D)
    return weight, bias, target


def test_token_selection_takes_the_per_position_minimum(token_problem):
    weight, bias, target = token_problem
    predict = tokenwise_predict(weight, bias)
    mask = torch.tensor([[1, 0, 1]] * B)
    k = 6
    res = cimle(predict, target, k=k, noise_shape=(N, DZ), mask=mask, generator=gen(4), select="token")
    noise = torch.randn((k, B, N, DZ), generator=gen(4))
    err = torch.stack([(predict(noise[j]) - target).pow(2).mean(-1) for j in range(k)], dim=1).detach()  # [B,k,N]
    torch.testing.assert_close(res.distances, err * mask[:, None])
    best = err.argmin(dim=1)  # [B, N]
    on = mask.bool()
    assert torch.equal(res.index[on], best[on])
    # the chosen distance at every masked position is that position's minimum over the k samples
    chosen = res.distances.gather(1, res.index[:, None])[:, 0]
    torch.testing.assert_close(chosen[on], err.min(dim=1).values[on])
    expected_z = noise.gather(0, best[None, ..., None].expand(1, B, N, DZ))[0]
    torch.testing.assert_close(res.z[on], expected_z[on])
    # token selection is never worse than image selection on the same samples
    image = cimle(predict, target, k=k, noise_shape=(N, DZ), mask=mask, generator=gen(4))
    assert res.loss <= image.loss + 1e-6
    torch.testing.assert_close(res.loss, least_squares(predict(res.z), target, mask))


def test_token_gradient_flows_only_through_chosen_samples(token_problem):
    weight, bias, target = token_problem
    k = 5
    calls = []

    def predict(z):
        calls.append(torch.is_grad_enabled())
        return z @ weight + bias

    res = cimle(predict, target, k=k, noise_shape=(N, DZ), generator=gen(2), select="token", vectorize=False)
    assert calls == [False] * k + [True]  # k samples without gradient, the assembled one with it
    res.loss.backward()
    # analytic gradient of the mean squared error at the chosen noise only
    resid = (res.z @ weight + bias - target).detach()  # [B, N, D]
    scale = 2.0 / resid.numel()
    torch.testing.assert_close(weight.grad, scale * torch.einsum("bnz,bnd->zd", res.z, resid))
    torch.testing.assert_close(bias.grad, scale * resid.sum(dim=(0, 1)))


def test_token_selection_with_one_position_equals_image_selection(token_problem):
    weight, bias, _ = token_problem
    target = torch.randn(B, 1, D)
    predict = tokenwise_predict(weight, bias)
    image = cimle(predict, target, k=7, noise_shape=(1, DZ), generator=gen(9))
    token = cimle(predict, target, k=7, noise_shape=(1, DZ), generator=gen(9), select="token")
    assert torch.equal(token.index[:, 0], image.index)
    torch.testing.assert_close(token.z, image.z)
    torch.testing.assert_close(token.loss, image.loss)
    torch.testing.assert_close(token.distances[:, :, 0], image.distances)


def test_token_selection_is_reproducible_from_the_generator(token_problem):
    weight, bias, target = token_problem
    predict = tokenwise_predict(weight, bias)
    a = cimle(predict, target, k=4, noise_shape=(N, DZ), generator=gen(5), select="token")
    b = cimle(predict, target, k=4, noise_shape=(N, DZ), generator=gen(5), select="token", chunk=3)
    c = cimle(predict, target, k=4, noise_shape=(N, DZ), generator=gen(6), select="token")
    assert torch.equal(a.z, b.z) and torch.equal(a.index, b.index) and torch.equal(a.loss, b.loss)
    assert not torch.equal(a.z, c.z)


def test_token_selection_argument_errors(token_problem):
    weight, bias, target = token_problem
    predict = tokenwise_predict(weight, bias)
    with pytest.raises(ValueError, match="select must be"):
        cimle(predict, target, k=2, noise_shape=(N, DZ), select="patch")
    with pytest.raises(ValueError, match="noise_shape \\(\\*positions, dim\\)"):
        cimle(predict, target, k=2, noise_shape=DZ, select="token")
    with pytest.raises(ValueError, match="noise_shape \\(\\*positions, dim\\)"):
        cimle(predict, target, k=2, noise_shape=(N + 1, DZ), select="token")
