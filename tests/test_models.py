"""Model tests: tiny CPU configs, fixed seeds."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from study.config import CIMLEConfig, Config, ModelConfig, MVAEConfig, NoiseConfig
from study.methods.model import MaskedAutoencoder, build_model, mask_indices
from study.models import ViTEncoder, load_pretrained_encoder, sincos_2d
from study.losses import cimle, least_squares

IMG, PATCH, CHANS = 16, 4, 3
N = (IMG // PATCH) ** 2  # 16 patches
N_MASK = 12
B = 4


def tiny_cfg(objective="ls", *, block=0, scope="image", injection="add", k=3, chunk=None,
             decoder_depth=2, norm_pix=False, dim=4) -> Config:
    model = ModelConfig(img_size=IMG, patch_size=PATCH, in_chans=CHANS, embed_dim=32, depth=2, num_heads=4,
                        decoder_dim=32, decoder_depth=decoder_depth, decoder_heads=4, norm_pix_loss=norm_pix)
    return Config(objective=objective, model=model,
                  noise=NoiseConfig(dim=dim, scope=scope, block=block, injection=injection),
                  cimle=CIMLEConfig(k=k, chunk=chunk), mvae=MVAEConfig(beta=0.01, depth=1))


def make_model(cfg: Config, seed: int = 0, **kw) -> MaskedAutoencoder:
    torch.manual_seed(seed)
    return build_model(cfg, **kw)


def make_batch(seed: int = 0, batch: int = B, n_mask: int = N_MASK):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randn(batch, CHANS, IMG, IMG, generator=g)
    order = torch.rand(batch, N, generator=g).argsort(dim=1)
    mask = torch.zeros(batch, N, dtype=torch.bool)
    mask.scatter_(1, order[:, :n_mask], True)
    return imgs, mask


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- pieces


def test_sincos_shape_and_cls_slot():
    emb = sincos_2d(32, 4, cls_token=True)
    assert emb.shape == (17, 32)
    assert torch.all(emb[0] == 0)
    assert torch.unique(emb[1:], dim=0).shape[0] == 16  # every position distinct
    # first half encodes the column, second half the row (layout of published MAE checkpoints)
    assert torch.equal(emb[1, :16], emb[5, :16])  # patches 0 and 4: same column
    assert torch.equal(emb[1, 16:], emb[2, 16:])  # patches 0 and 1: same row
    with pytest.raises(ValueError):
        sincos_2d(30, 4)


def test_patchify_layout_and_roundtrip():
    model = make_model(tiny_cfg())
    imgs, _ = make_batch()
    patches = model.patchify(imgs)  # [B, N, p*p*C]
    assert patches.shape == (B, N, PATCH * PATCH * CHANS)
    # patch 1 is row 0, column 1; flattened as (row, col, channel)
    expected = imgs[:, :, 0:PATCH, PATCH : 2 * PATCH].permute(0, 2, 3, 1).reshape(B, -1)
    assert torch.equal(patches[:, 1], expected)
    assert torch.equal(model.unpatchify(patches), imgs)


def test_mask_indices():
    _, mask = make_batch()
    ids = mask_indices(mask, N)
    assert ids.keep.shape == (B, N - N_MASK) and ids.masked.shape == (B, N_MASK) and ids.num_masked == N_MASK
    for b in range(B):
        assert torch.equal(ids.keep[b], torch.nonzero(~mask[b]).flatten())
        assert torch.equal(ids.masked[b], torch.nonzero(mask[b]).flatten())
    order = torch.cat([ids.keep, ids.masked], dim=1)
    assert torch.equal(torch.gather(order, 1, ids.restore), torch.arange(N).expand(B, N))
    bad = mask.clone()
    bad[0] = False
    with pytest.raises(ValueError, match="same number"):
        mask_indices(bad)
    with pytest.raises(TypeError):
        mask_indices(mask.long())


def test_norm_pix_target():
    model = make_model(tiny_cfg(norm_pix=True))
    imgs, _ = make_batch()
    imgs = imgs * 3 + 1
    target = model.target(imgs)
    assert torch.allclose(target.mean(dim=-1), torch.zeros(B, N), atol=1e-5)
    assert torch.allclose(target.var(dim=-1), torch.ones(B, N), atol=1e-4)
    assert torch.allclose(model.denormalize_pred(target, imgs), model.patchify(imgs), atol=1e-5)
    plain = make_model(tiny_cfg(norm_pix=False))
    assert torch.equal(plain.target(imgs), plain.patchify(imgs))


# --------------------------------------------------------------------------- encoder


def _timm_vit() -> VisionTransformer:
    return VisionTransformer(img_size=IMG, patch_size=PATCH, in_chans=CHANS, num_classes=0, embed_dim=32,
                             depth=2, num_heads=4, mlp_ratio=4.0, qkv_bias=True, class_token=True,
                             global_pool="token")


def test_load_facebook_format_checkpoint(tmp_path):
    torch.manual_seed(1)
    vit = _timm_vit().eval()
    # a published MAE checkpoint carries the fixed sin-cos table in pos_embed: give timm ours
    with torch.no_grad():
        vit.pos_embed.copy_(sincos_2d(32, IMG // PATCH, cls_token=True)[None])
    sd = dict(vit.state_dict())
    sd["decoder_embed.weight"] = torch.randn(16, 32)
    sd["decoder_pred.bias"] = torch.randn(48)
    sd["mask_token"] = torch.randn(1, 1, 16)
    path = tmp_path / "mae_pretrain.pth"
    torch.save({"model": sd, "epoch": 799}, path)

    torch.manual_seed(2)
    enc = ViTEncoder(IMG, PATCH, CHANS, 32, 2, 4).eval()
    dropped = load_pretrained_encoder(enc, path)
    assert dropped == ["decoder_embed.weight", "decoder_pred.bias", "mask_token"]
    assert set(enc.state_dict()) == set(vit.state_dict())
    for name, value in vit.state_dict().items():
        assert torch.equal(enc.state_dict()[name], value), name

    imgs, _ = make_batch()
    with torch.no_grad():
        ours = enc.features(imgs, "cls")
        theirs = vit.forward_features(imgs)[:, 0]
        assert torch.allclose(ours, theirs, atol=1e-5)
        assert torch.allclose(enc.features(imgs, "mean"), vit.forward_features(imgs)[:, 1:].mean(1), atol=1e-5)
    # a bare state dict works too
    load_pretrained_encoder(ViTEncoder(IMG, PATCH, CHANS, 32, 2, 4), vit.state_dict())


def test_load_checkpoint_errors_name_keys():
    enc = ViTEncoder(IMG, PATCH, CHANS, 32, 2, 4)
    sd = dict(enc.state_dict())
    del sd["norm.weight"]
    sd["fc_norm.weight"] = torch.ones(32)
    with pytest.raises(ValueError, match=r"missing keys \['norm.weight'\].*unexpected keys \['fc_norm.weight'\]"):
        load_pretrained_encoder(enc, {"model": sd})
    sd = dict(enc.state_dict())
    sd["pos_embed"] = torch.zeros(1, 5, 32)
    with pytest.raises(ValueError, match="pos_embed"):
        load_pretrained_encoder(enc, sd)


def test_our_pretrain_checkpoint_loads_into_encoder():
    model = make_model(tiny_cfg("mvae"))
    enc = ViTEncoder(IMG, PATCH, CHANS, 32, 2, 4)
    load_pretrained_encoder(enc, {"model": model.state_dict()})
    for name, value in model.encoder.state_dict().items():
        assert torch.equal(enc.state_dict()[name], value)


def test_encoder_sees_visible_patches_only():
    torch.manual_seed(0)
    enc = ViTEncoder(IMG, PATCH, CHANS, 32, 2, 4).eval()
    imgs, mask = make_batch()
    ids = mask_indices(mask)
    out = enc(imgs, ids.keep)
    assert out.shape == (B, 1 + N - N_MASK, 32)
    # changing the masked patches' pixels changes nothing
    model = make_model(tiny_cfg())
    patches = model.patchify(imgs)
    patches = torch.where(mask[..., None], torch.randn_like(patches) * 10, patches)
    out2 = enc(model.unpatchify(patches), ids.keep)
    assert torch.allclose(out, out2, atol=1e-5)
    # the gather uses the right positions: permuting ids_keep permutes the tokens
    perm = torch.randperm(ids.keep.shape[1])
    out3 = enc(imgs, ids.keep[:, perm])
    assert torch.allclose(out3[:, 1:], out[:, 1:][:, perm], atol=1e-5)
    assert torch.allclose(out3[:, 0], out[:, 0], atol=1e-5)
    # with all patches kept, the forward is the plain ViT
    full = enc(imgs, torch.arange(N).expand(B, N))
    assert torch.allclose(full, enc(imgs), atol=1e-6)


# --------------------------------------------------------------------------- objectives


CASES = [("ls", 0, "image", "add")]
CASES += [("cimle", j, s, i) for j in (0, 1, 2) for s in ("image", "token") for i in ("add", "adaln")]
CASES += [("mvae", j, "token", i) for j in (0, 1, 2) for i in ("add", "adaln")]


@pytest.mark.parametrize("objective,block,scope,injection", CASES)
def test_forward_backward(objective, block, scope, injection):
    model = make_model(tiny_cfg(objective, block=block, scope=scope, injection=injection))
    imgs, mask = make_batch()
    out = model(imgs, mask, generator=gen())
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert "recon" in out.stats
    for key, value in out.stats.items():
        assert value.ndim == 0 and not value.requires_grad and torch.isfinite(value), key
    out.loss.backward()
    for name, p in model.encoder.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    if objective == "mvae":
        assert model.variational_encoder.mu.weight.grad.abs().sum() > 0
        assert "kl" in out.stats
    else:
        assert not hasattr(model, "variational_encoder")
    noise_params = [p for n, p in model.named_parameters() if "decoder_noise" in n]
    assert bool(noise_params) == (objective != "ls")
    for p in noise_params:
        assert p.grad is not None


@pytest.mark.parametrize("scope,injection,block", [("image", "add", 0), ("token", "add", 2), ("image", "adaln", 1),
                                                  ("token", "adaln", 0)])
def test_cimle_loss_is_least_squares_at_chosen_z(scope, injection, block):
    k = 4
    model = make_model(tiny_cfg("cimle", block=block, scope=scope, injection=injection, k=k))
    if injection == "adaln":  # zero-initialised: make z matter
        torch.manual_seed(3)
        for p in model.decoder.decoder_noise_mod.parameters():
            torch.nn.init.normal_(p, std=0.3)
    imgs, mask = make_batch()
    out = model(imgs, mask, generator=gen(7))

    # independent replay: same noise stream, explicit loop and argmin
    with torch.no_grad():
        ids = mask_indices(mask)
        hidden = model.decoder.prefix(model.encoder(imgs, ids.keep), ids.restore)
        shape = (N_MASK, 4) if scope == "token" else (4,)
        noise = torch.randn((k, B, *shape), generator=gen(7))
        target = model.target(imgs)
        preds = torch.stack([model.decoder.suffix(hidden, z, mask) for z in noise])  # [k, B, N, ppc]
        err = ((preds - target) ** 2).mean(-1)  # [k, B, N]
        dist = (err * mask).sum(-1) / mask.sum(-1)  # [k, B]
        best = dist.argmin(0)  # [B]
        chosen = noise[best, torch.arange(B)]
        expected = least_squares(model.decoder.suffix(hidden, chosen, mask), target, mask)
    assert torch.allclose(out.loss, expected, atol=1e-5)
    assert torch.allclose(out.stats["dist_chosen"], dist.min(0).values.mean(), atol=1e-5)
    assert out.stats["dist_gap"] > 0


def test_ls_loss_ignores_noise_config():
    imgs, mask = make_batch()
    losses, states = [], []
    for kw in (dict(block=0, scope="image", injection="add", dim=4), dict(block=2, scope="token", injection="adaln", dim=9)):
        model = make_model(tiny_cfg("ls", **kw))
        losses.append(model(imgs, mask, generator=gen()).loss)
        states.append(model.state_dict())
    assert torch.equal(losses[0], losses[1])
    assert states[0].keys() == states[1].keys()
    # cimle shares every non-noise initial weight with ls at the same seed
    cim = make_model(tiny_cfg("cimle"))
    for name, value in states[0].items():
        assert torch.equal(cim.state_dict()[name], value), name


def _count_calls(modules):
    """Calls of each module, through ``__call__`` or (a decoder block's last-block path) ``forward_at``."""
    counts = {name: 0 for name in modules}

    def hook(name):
        def fn(module, args, output):
            counts[name] += 1
        return fn

    class Unpatch:
        def __init__(self, module):
            self.module = module

        def remove(self):
            del self.module.forward_at

    def counting(name, method):
        def fn(*args, **kwargs):
            counts[name] += 1
            return method(*args, **kwargs)
        return fn

    handles = [m.register_forward_hook(hook(name)) for name, m in modules.items()]
    for name, m in modules.items():
        if hasattr(m, "forward_at"):
            m.forward_at = counting(name, m.forward_at)
            handles.append(Unpatch(m))
    return counts, handles


@pytest.mark.parametrize("chunk,vectorize", [(None, True), (2, True), (None, False)])
def test_decoder_prefix_shared_across_samples(chunk, vectorize):
    k = 4
    for block in (2, 1):
        model = make_model(tiny_cfg("cimle", block=block, k=k, chunk=chunk), vectorize=vectorize)
        mods = {"enc0": model.encoder.blocks[0], "enc1": model.encoder.blocks[1],
                "dec0": model.decoder.decoder_blocks[0], "dec1": model.decoder.decoder_blocks[1],
                "pred": model.decoder.decoder_pred}
        counts, handles = _count_calls(mods)
        imgs, mask = make_batch()
        model(imgs, mask, generator=gen()).loss.backward()
        for h in handles:
            h.remove()
        per_sample = (k if not vectorize else -(-k // (chunk or k))) + 1  # selection calls + gradient call
        assert counts["enc0"] == counts["enc1"] == 1
        assert counts["dec0"] == (1 if block >= 1 else per_sample)
        assert counts["dec1"] == (1 if block == 2 else per_sample)
        assert counts["pred"] == per_sample


@pytest.mark.parametrize("scope", ["image", "token"])
@pytest.mark.parametrize("injection", ["add", "adaln"])
def test_vmap_equals_loop(scope, injection):
    model = make_model(tiny_cfg("cimle", block=0, scope=scope, injection=injection, k=5))
    if injection == "adaln":
        torch.manual_seed(3)
        for p in model.decoder.decoder_noise_mod.parameters():
            torch.nn.init.normal_(p, std=0.3)
    imgs, mask = make_batch()
    ids = mask_indices(mask)
    hidden = model.decoder.prefix(model.encoder(imgs, ids.keep), ids.restore)
    target = model.target(imgs)
    shape = model.noise_shape(ids.num_masked)
    results = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no functorch slow-fallback warning from attention
        for vectorize, chunk in ((True, None), (True, 2), (False, None)):
            results.append(cimle(lambda z: model.decoder.suffix(hidden, z, mask), target, k=5, noise_shape=shape,
                                 mask=mask, chunk=chunk, generator=gen(11), vectorize=vectorize))
    for res in results[1:]:
        assert torch.allclose(res.distances, results[0].distances, atol=1e-5)
        assert torch.equal(res.index, results[0].index)
        assert torch.allclose(res.loss, results[0].loss, atol=1e-6)


# --------------------------------------------------------------------------- evaluation API


@pytest.mark.parametrize("objective", ["ls", "cimle", "mvae"])
@pytest.mark.parametrize("injection", ["add", "adaln"])
def test_sample_and_reconstruct(objective, injection):
    model = make_model(tiny_cfg(objective, block=1, injection=injection)).eval()
    if model.decoder.decoder_noise_mod is not None:  # zero-initialised: z has no effect until trained
        torch.manual_seed(3)
        for p in model.decoder.decoder_noise_mod.parameters():
            torch.nn.init.normal_(p, std=0.3)
    imgs, mask = make_batch()
    samples = model.sample(imgs, mask, 3, generator=gen())
    assert samples.shape == (3, B, N, PATCH * PATCH * CHANS)
    rec = model.reconstruct(imgs, mask)
    assert rec.shape == (B, N, PATCH * PATCH * CHANS)
    if objective == "ls":
        assert torch.equal(samples[0], samples[1]) and torch.equal(samples[1], samples[2])
        assert torch.allclose(samples[0], rec)
    else:
        for i in range(3):
            for j in range(i + 1, 3):
                diff = (samples[i] - samples[j]).abs()
                assert diff[mask].amax(dim=-1).min() > 0  # every masked patch differs
    # repeatable with the same generator seed
    assert torch.equal(samples, model.sample(imgs, mask, 3, generator=gen()))


def test_mvae_forces_token_scope_and_param_groups():
    model = make_model(tiny_cfg("mvae", scope="image"))
    assert model.noise.scope == "token"
    assert model.noise_shape(N_MASK) == (N_MASK, 4)
    names = {n for n, _ in model.named_parameters()}
    assert any(n.startswith("variational_encoder.") for n in names)
    assert model.no_weight_decay() <= names
    assert {"encoder.cls_token", "encoder.pos_embed", "decoder.mask_token", "decoder.decoder_pos_embed"} <= model.no_weight_decay()
    assert not model.encoder.pos_embed.requires_grad and not model.decoder.decoder_pos_embed.requires_grad


def test_default_config_builds_and_runs():
    cfg = Config(objective="cimle")
    torch.manual_seed(0)
    model = build_model(cfg)
    imgs = torch.randn(2, 1, 28, 28)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :12] = True
    assert torch.isfinite(model(imgs, mask, generator=gen()).loss)


def test_ls_rejects_noise():
    model = make_model(tiny_cfg("ls"))
    imgs, mask = make_batch()
    ids = mask_indices(mask)
    hidden = model.decoder.prefix(model.encoder(imgs, ids.keep), ids.restore)
    with pytest.raises(ValueError, match="without noise"):
        model.decoder.suffix(hidden, torch.zeros(B, 4), mask)
    cim = make_model(tiny_cfg("cimle", scope="image"))
    hidden = cim.decoder.prefix(cim.encoder(imgs, ids.keep), ids.restore)
    with pytest.raises(ValueError, match="z has shape"):
        cim.decoder.suffix(hidden, torch.zeros(B, N_MASK, 4), mask)


def test_mvae_kl_is_a_per_feature_mean_weighted_by_beta():
    cfg = tiny_cfg("mvae", dim=6)
    cfg.mvae = MVAEConfig(beta=30.0, depth=None)
    model = make_model(cfg)
    assert len(model.variational_encoder.blocks) == cfg.model.depth  # depth None: as deep as the encoder
    torch.nn.init.normal_(model.variational_encoder.logvar.weight, std=0.3)  # sigma != 1 somewhere
    imgs, mask = make_batch()
    out = model(imgs, mask, generator=gen())
    mu, logvar = model.variational_encoder(imgs, mask_indices(mask).masked)  # [B, N_mask, 6]
    per_feature = 0.5 * (mu**2 + logvar.exp() - 1 - logvar)
    torch.testing.assert_close(out.stats["kl"], per_feature.mean().detach())
    assert not torch.allclose(out.stats["kl"], per_feature.sum(-1).mean().detach())
    torch.testing.assert_close(out.loss, out.stats["recon"] + 30.0 * per_feature.mean(), rtol=1e-5, atol=1e-6)


def test_mvae_published_defaults_reach_the_optimizer():
    from study.config import load_config
    from study.train.optim import param_groups

    cfg = load_config("experiments/configs/cpu-small.yaml", ["objective=mvae"])
    assert (cfg.mvae.beta, cfg.mvae.lr_factor) == (30.0, 0.01)
    model = build_model(cfg)
    groups = param_groups(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in groups:
        variational = {names[id(p)].startswith("variational_encoder.") for p in group["params"]}
        assert len(variational) == 1
        assert group["lr_scale"] == (0.01 if variational.pop() else 1.0)


# --------------------------------------------------------------------------- token-wise head, factorised cIMLE


def head_cfg(objective="cimle", select="token", scope="token", k=3):
    cfg = tiny_cfg(objective, block="head", scope=scope, k=k)
    cfg.cimle.select = select
    return cfg


def test_head_output_of_a_token_depends_on_its_own_noise_only():
    model = make_model(head_cfg())
    imgs, mask = make_batch()
    with torch.no_grad():
        hidden, ids = model._context(imgs, mask)
        z = torch.randn(B, N_MASK, 4, generator=gen(1))
        base = model.decoder.suffix(hidden, z, mask)
        z2 = z.clone()
        z2[:, 3] += 1.0  # change the noise of the 4th masked patch only
        moved = (model.decoder.suffix(hidden, z2, mask) - base).abs().amax(-1)  # [B, N]
    changed = torch.zeros(B, N, dtype=torch.bool)
    changed[torch.arange(B), ids.masked[:, 3]] = True
    assert (moved[changed] > 0).all() and (moved[~changed] == 0).all()


def test_token_cimle_loss_is_least_squares_at_the_per_patch_nearest_sample():
    k = 4
    model = make_model(head_cfg(k=k))
    imgs, mask = make_batch()
    out = model(imgs, mask, generator=gen(7))
    with torch.no_grad():  # independent replay: explicit loop, argmin per masked patch
        hidden, ids = model._context(imgs, mask)
        noise = torch.randn((k, B, N_MASK, 4), generator=gen(7))
        target = model.target(imgs)
        rows = ids.masked[..., None].expand(-1, -1, target.shape[-1])
        err = torch.stack([(model.decoder.suffix(hidden, z, mask).gather(1, rows) - target.gather(1, rows))
                           .pow(2).mean(-1) for z in noise])  # [k, B, N_MASK]
        best = err.argmin(0)
        chosen = noise.gather(0, best[None, ..., None].expand(1, B, N_MASK, 4))[0]
        expected = least_squares(model.decoder.suffix(hidden, chosen, mask), target, mask)
    assert torch.allclose(out.loss, expected, atol=1e-5)
    assert torch.allclose(out.stats["dist_chosen"], err.min(0).values.mean(), atol=1e-5)
    out.loss.backward()
    assert model.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_least_squares_gets_the_same_head_fed_zero_noise():
    ls, cim = make_model(head_cfg("ls", "image", "image")), make_model(head_cfg())
    assert ls.decoder.decoder_head is not None and ls.decoder.decoder_pred is None
    cim_sd = cim.state_dict()
    for name, p in ls.state_dict().items():  # same parameters, same initial values from the same seed
        assert torch.equal(p, cim_sd[name]), name
    imgs, mask = make_batch()
    torch.testing.assert_close(ls.reconstruct(imgs, mask), cim.reconstruct(imgs, mask))


def test_attention_explicit_path_matches_sdpa_and_runs_where_wanted(monkeypatch):
    """The explicit matmul path (vmap, bf16 on CPU) computes what timm's SDPA path does."""
    import study.models.attention as attention

    torch.manual_seed(0)
    layer = attention.Attention(16, num_heads=2, qkv_bias=True)
    x = torch.randn(3, 7, 16)
    assert not attention.explicit_attention_wanted(x)  # fp32 on CPU: timm's forward, as the studies ran
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert attention.explicit_attention_wanted(x)
    sdpa = layer(x)
    monkeypatch.setattr(attention, "explicit_attention_wanted", lambda t: True)
    torch.testing.assert_close(layer(x), sdpa, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("block,scope,injection,select", [
    ("head", "token", "add", "token"), ("head", "image", "add", "image"), ("head", "token", "add", "image"),
    (0, "image", "add", "image"), (1, "token", "adaln", "image"), (2, "image", "adaln", "image")])
@pytest.mark.parametrize("chunk", [None, 1, 3])  # all samples in one call; one at a time; 3 (the last call holds 2)
@pytest.mark.parametrize("decode", ["vmap", "batched"])  # torch.func.vmap; the samples folded into the batch
def test_cimle_selection_equals_the_reference_decode_of_every_token(block, scope, injection, select, chunk, decode,
                                                                     monkeypatch):
    """The objective decodes only the masked patches and, with the noise in the head, reads the decoder
    features through the head's first layer once; the reference decodes every token per sample
    (``decoder.suffix``) and then picks the masked rows. Same noise: the same choices, the same loss."""
    k = 8
    cfg = tiny_cfg("cimle", block=block, scope=scope, injection=injection, k=k, chunk=chunk)
    cfg = dataclasses.replace(cfg, cimle=dataclasses.replace(cfg.cimle, select=select, decode=decode))
    model = make_model(cfg)
    imgs, mask = make_batch(batch=16)
    ids = mask_indices(mask, model.num_patches)
    hidden = model.decoder.prefix(model.encoder(imgs, ids.keep), ids.restore)  # [B, 1+N, Dd]
    rows = ids.masked[..., None].expand(-1, -1, PATCH * PATCH * CHANS)
    target = model.target(imgs).gather(1, rows)  # [B, N_mask, p*p*C]
    ref = cimle(lambda z: model.decoder.suffix(hidden, z, mask).gather(1, rows), target, k=k,
                noise_shape=model.noise_shape(N_MASK), generator=gen(3), select=select)
    if decode == "batched":  # the folded path must not fall back on vmap
        monkeypatch.setattr(torch.func, "vmap", lambda *a, **kw: pytest.fail("vmap in the batched decode"))
    new = model(imgs, mask, generator=gen(3)).selection
    assert torch.equal(new.index, ref.index)
    torch.testing.assert_close(new.distances, ref.distances, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(new.loss, ref.loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(new.pred, ref.pred, rtol=1e-5, atol=1e-6)
    new.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    ref.loss.backward()
    for name, param in model.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(grads[name], param.grad, rtol=1e-4, atol=1e-7, msg=name)
