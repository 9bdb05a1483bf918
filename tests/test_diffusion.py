"""The diffusion core, tested on its own: the sampler's arithmetic, guidance, the random streams, the
prior's causal mask and dropped condition, best-of-N, EMA, the learning-rate schedule, slerp, blur."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training.conditioning import Caption, FrozenText, drop_caption
from training.decoder import gaussian_blur
from training.decoder_net import Decoder, DecoderConfig
from training.diffusion import PURPOSES, ddim_sample, guided, noise_schedule, seeded_noise, stream
from training.generate import slerp
from training.prior_net import DiffusionPrior, PriorConfig
from training.samplers import DecoderSampler, PriorSampler, best_of, step_generators
from training.trainer import ema_update, warmup_cosine

PREDICTIONS = ("sample", "epsilon", "v_prediction")


def perfect(x_0: torch.Tensor, prediction_type: str):
    """A denoiser that knows x_0: returns exactly the output of the given type for any x_t."""
    alphas = noise_schedule().alphas_cumprod

    def denoise(x_t, t):
        a = alphas[t].view(-1, *([1] * (x_t.dim() - 1))).to(x_t.dtype)
        eps = (x_t - a.sqrt() * x_0) / (1 - a).sqrt()
        return {"sample": x_0, "epsilon": eps, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x_0}[prediction_type]

    return denoise


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("clip_sample", [False, True])
def test_ddim_with_a_perfect_denoiser_returns_x0(prediction_type, clip_sample):
    """eta 0: the path keeps the starting noise ε, and the last step lands on t = 0 of the schedule,
    x = √ᾱ_0·x_0 + √(1−ᾱ_0)·ε exactly (ᾱ_0 = 1 − 4e-5); eta 1 lands within a few hundredths of x_0."""
    x_0 = torch.rand(4, 3, 5, 5, generator=torch.Generator().manual_seed(0)) * 1.8 - 0.9
    noise = seeded_noise([0, 1, 2, 3], (3, 5, 5), "decoder_start")
    a_0 = noise_schedule().alphas_cumprod[0]
    out = ddim_sample(perfect(x_0, prediction_type), noise, 8, prediction_type, clip_sample)
    torch.testing.assert_close(out, a_0.sqrt() * x_0 + (1 - a_0).sqrt() * noise, atol=2e-5, rtol=0)
    generators = step_generators([0, 1, 2, 3], "decoder_step")
    ancestral = ddim_sample(perfect(x_0, prediction_type), noise, 8, prediction_type, clip_sample, 1.0, generators)
    assert (ancestral - x_0).abs().max() < 0.05


def test_clipping_rederives_the_noise_from_the_clipped_x0():
    """GLIDE/ADM: with x̂_0 clipped, ε̂ = (x_t − √ᾱ_t·clip(x̂_0)) / √(1−ᾱ_t). A denoiser that always says
    x̂_0 = 3 then walks a consistent path: the output is √ᾱ_0·1 + √(1−ᾱ_0)·ε̂ of the first step. With ε̂
    from the unclipped x̂_0 each later step would pull the noise estimate off by about 2√(ᾱ/(1−ᾱ))."""
    x_T = seeded_noise([5], (3, 4, 4), "decoder_start")
    alphas = noise_schedule().alphas_cumprod
    out = ddim_sample(lambda x, t: torch.full_like(x, 3.0), x_T, 4, "sample", clip_sample=True)
    eps = (x_T - alphas[999].sqrt()) / (1 - alphas[999]).sqrt()
    torch.testing.assert_close(out, alphas[0].sqrt() + (1 - alphas[0]).sqrt() * eps, atol=1e-5, rtol=0)


def test_eta0_is_deterministic_and_eta1_draws_only_from_the_samples_own_streams():
    net = Decoder(
        DecoderConfig(
            image_size=8, dim=8, channels=[8, 16], layers_per_block=1, head_width=8, context_width=8, norm_groups=4
        )
    )
    z = F.normalize(torch.randn(3, 8, generator=torch.Generator().manual_seed(1)), dim=-1)
    sampler = DecoderSampler(net.eval(), FrozenText(), "v_prediction", sampling={"steps": 3, "eta": 0.0})
    torch.testing.assert_close(sampler.sample(z, [4, 5, 6]), sampler.sample(z, [4, 5, 6]), atol=0, rtol=0)
    sampler.sampling.eta = 1.0
    batch = sampler.sample(z, [4, 5, 6])
    torch.testing.assert_close(sampler.sample(z[[2, 0]], [6, 4]), batch[[2, 0]], atol=1e-5, rtol=0)
    assert not torch.allclose(sampler.sample(z[:1], [7]), batch[:1], atol=1e-3)


def test_streams_of_seeds_and_purposes_are_independent():
    """Every (seed, purpose) stream, and a sampler's per-step stream of one seed against the starting noise
    of another (the old scheme reused seed 2s+1), is uncorrelated: |r| below 5 standard errors."""
    n = 20_000
    draws = {(s, p): torch.randn(n, generator=stream(s, p)) for s in range(4) for p in PURPOSES}
    for s in range(4):
        draws[(s, "step")] = torch.randn(n, generator=step_generators([s], "decoder_step")[0])
    draws[(9, "start")] = seeded_noise([9], (n,), "decoder_start")[0]
    keys = list(draws)
    matrix = np.corrcoef(torch.stack([draws[k] for k in keys]).numpy())
    off_diagonal = np.abs(matrix[~np.eye(len(keys), dtype=bool)])
    assert off_diagonal.max() < 5 / math.sqrt(n)
    torch.testing.assert_close(torch.randn(n, generator=stream(3, "prior_start")), draws[(3, "prior_start")])
    with pytest.raises(ValueError, match="non-negative"):
        stream(-1, "train")


def test_guidance_scale_one_is_the_conditional_and_zero_the_unconditional_output():
    cond, uncond = torch.randn(2, 5), torch.randn(2, 5)
    torch.testing.assert_close(guided(cond, uncond, 1.0), cond)
    torch.testing.assert_close(guided(cond, uncond, 0.0), uncond)
    torch.testing.assert_close(guided(cond, uncond, 3.0), uncond + 3 * (cond - uncond))
    net = Decoder(
        DecoderConfig(
            image_size=8, dim=8, channels=[8, 16], layers_per_block=1, head_width=8, context_width=8, norm_groups=4
        )
    ).eval()
    sampler = DecoderSampler(net, FrozenText(), "v_prediction", sampling={"steps": 3})
    z = F.normalize(torch.randn(2, 8), dim=-1)
    unconditional = sampler.sample(torch.zeros_like(z), [0, 1], guidance_scale=1.0)
    torch.testing.assert_close(sampler.sample(z, [0, 1], guidance_scale=0.0), unconditional, atol=1e-5, rtol=0)


def tiny_prior(tokens: bool = True) -> DiffusionPrior:
    config = PriorConfig(dim=8, width=16, depth=2, heads=2, text_token_width=8 if tokens else 0, max_text_tokens=5)
    torch.manual_seed(0)
    return DiffusionPrior(config).eval()


@pytest.mark.parametrize("tokens", [True, False])
def test_prior_attention_is_causal_and_ignores_padding(tokens):
    """Perturbing x_t (second to last in the sequence) leaves the outputs of every earlier position as they
    were and changes the query's; a padding token's encoding changes nothing (it is masked out)."""
    net = tiny_prior(tokens)
    hidden = []
    net.transformer.norm_out.register_forward_hook(lambda module, args, out: hidden.append(out))
    text = dict(text_tokens=torch.randn(2, 5, 8), token_mask=torch.tensor([[1, 1, 1, 0, 0]] * 2).bool())
    inputs = dict(t=torch.tensor([500, 20]), z_t=torch.randn(2, 8), **(text if tokens else {}))
    x_t = torch.randn(2, 8)
    net(x_t=x_t, **inputs)
    net(x_t=x_t + 1.0, **inputs)
    before, after = hidden[:2]
    torch.testing.assert_close(after[:, :-2], before[:, :-2], atol=1e-6, rtol=0)
    assert not torch.allclose(after[:, -1], before[:, -1])
    if tokens:
        padded = dict(inputs, text_tokens=text["text_tokens"].clone())
        padded["text_tokens"][:, 3:] += 5.0
        torch.testing.assert_close(net(x_t=x_t, **padded), net(x_t=x_t, **inputs), atol=1e-6, rtol=0)
        shorter = dict(inputs, text_tokens=text["text_tokens"][:, :3], token_mask=text["token_mask"][:, :3])
        torch.testing.assert_close(net(x_t=x_t, **shorter), net(x_t=x_t, **inputs), atol=1e-6, rtol=0)


def test_a_dropped_caption_is_the_empty_caption_whatever_the_caption_was(tiny_clip_dir):
    text = FrozenText("clip", {"model": str(tiny_clip_dir)})
    encoder = text.encoder()
    empty = text.empty("cpu")
    torch.testing.assert_close(empty.z_t, encoder.encode_texts([""]))
    tokens, mask = encoder.encode_text_tokens([""])
    torch.testing.assert_close(empty.tokens, tokens)
    assert torch.equal(empty.mask, mask) and int(mask.sum()) == 2  # start and end tokens
    captions = ["a large red circle at the top left", "a small blue square"]
    caption = Caption(encoder.encode_texts(captions).clone(), *text.tokens(captions, "cpu"))
    drop = torch.tensor([True, False])
    dropped = drop_caption(caption, drop, empty)
    torch.testing.assert_close(dropped.z_t[0], empty.z_t[0])
    torch.testing.assert_close(dropped.tokens[1], caption.tokens[1])
    width, length = text.width()
    net = DiffusionPrior(
        PriorConfig(dim=32, width=16, depth=1, heads=2, text_token_width=width, max_text_tokens=length)
    )
    x_t, t = torch.randn(1, 32).expand(2, -1), torch.tensor([300, 300])
    everything = drop_caption(caption, torch.ones(2, dtype=torch.bool), empty)
    out = net.eval()(x_t, t, everything.z_t, everything.tokens, everything.mask)
    torch.testing.assert_close(out[0], out[1], atol=1e-6, rtol=0)
    out = net(x_t, t, caption.z_t, caption.tokens, caption.mask)
    assert not torch.allclose(out[0], out[1])


def test_a_captionless_decoder_call_sees_what_training_puts_in_place_of_a_dropped_caption(tiny_clip_dir):
    """Image variations (no caption) give the network the very text tokens and mask that a training step
    gives it for a dropped caption, recorded at the network's input."""
    from training.decoder import DecoderModule

    clip = {"model": str(tiny_clip_dir)}
    width, _ = FrozenText("clip", clip).width()
    sizes = dict(image_size=8, dim=32, channels=[8, 16], layers_per_block=1, head_width=8, context_width=8)
    module = DecoderModule(
        dict(sizes, norm_groups=4, text_token_width=width), clip, text_tokens="clip", text_drop_prob=1.0
    )
    seen = []
    module.net.register_forward_pre_hook(lambda net, args: seen.append(args[3:5]))
    module.ema.register_forward_pre_hook(lambda net, args: seen.append(args[3:5]))
    batch = {"image": torch.zeros(2, 3, 8, 8), "z_i": F.normalize(torch.randn(2, 32), dim=-1), "caption": ["a", "b"]}
    module.loss(batch, torch.Generator().manual_seed(0), module.net)
    module.sampler.sample(batch["z_i"], [0, 1], captions=None, steps=1, guidance_scale=1.0)
    (trained_tokens, trained_mask), (sampled_tokens, sampled_mask) = seen
    torch.testing.assert_close(sampled_tokens, trained_tokens)
    assert torch.equal(sampled_mask, trained_mask) and int(trained_mask[0].sum()) == 2  # the start and end of ""


def test_guidance_of_the_prior_and_a_text_token_decoder_subtracts_the_dropped_caption(tiny_clip_dir):
    """At scale 0 the guided samplers return what they return at scale 1 for the dropped condition: the
    prior for the empty caption (z_t("") and its tokens), the decoder for the zero z and the empty caption."""
    text = FrozenText("clip", {"model": str(tiny_clip_dir)})
    width, length = text.width()
    torch.manual_seed(0)
    prior = DiffusionPrior(
        PriorConfig(dim=32, width=16, depth=1, heads=2, text_token_width=width, max_text_tokens=length)
    )
    sampler = PriorSampler(prior.eval(), text, {"steps": 3, "candidates": 3})
    captions = ["a large red circle", "a small blue square"]
    z_t = text.encoder().encode_texts(captions).clone()
    unguided = sampler.candidates(text.empty("cpu").z_t.expand(2, -1), ["", ""], [0, 1], guidance_scale=1.0)
    torch.testing.assert_close(
        sampler.candidates(z_t, captions, [0, 1], guidance_scale=0.0), unguided, atol=1e-5, rtol=0
    )
    assert not torch.allclose(sampler.candidates(z_t, captions, [0, 1], guidance_scale=1.0), unguided, atol=1e-3)
    sizes = dict(image_size=8, dim=32, channels=[8, 16], layers_per_block=1, head_width=8, context_width=8)
    decoder = Decoder(DecoderConfig(**sizes, norm_groups=4, text_token_width=width)).eval()
    images = DecoderSampler(decoder, text, "v_prediction", sampling={"steps": 3})
    z = F.normalize(torch.randn(2, 32), dim=-1)
    dropped = images.sample(torch.zeros_like(z), [0, 1], None, guidance_scale=1.0)
    torch.testing.assert_close(images.sample(z, [0, 1], captions, guidance_scale=0.0), dropped, atol=1e-5, rtol=0)


def test_image_samplers_clip_x0_and_the_prior_does_not(monkeypatch):
    """Images live in [-1, 1], so their samplers clip x̂_0 (and re-derive ε̂ from it); embeddings do not."""
    import training.samplers as samplers
    from training.decoder_net import Upsampler, UpsamplerConfig

    calls = []
    monkeypatch.setattr(samplers, "ddim_sample", lambda *a, **k: calls.append(k.get("clip_sample", False)) or a[1])
    net = Decoder(
        DecoderConfig(
            image_size=8, dim=8, channels=[8, 16], layers_per_block=1, head_width=8, context_width=8, norm_groups=4
        )
    )
    DecoderSampler(net, FrozenText(), "v_prediction").sample(torch.zeros(1, 8), [0])
    up = Upsampler(UpsamplerConfig(image_size=16, dim=0, channels=[8, 16], norm_groups=4))
    samplers.UpsamplerSampler(up, "v_prediction").sample(torch.zeros(1, 3, 4, 4), [0])
    PriorSampler(tiny_prior(tokens=False), FrozenText(), {"candidates": 1}).candidates(torch.zeros(1, 8), ["a"], [0])
    assert calls == [True, True, False]


def test_best_of_n_keeps_each_prompts_candidate_nearest_its_text_embedding():
    z_t = F.normalize(torch.randn(3, 8, generator=torch.Generator().manual_seed(2)), dim=-1)
    candidates = F.normalize(torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(3)), dim=-1)
    chosen = best_of(candidates, z_t)
    for b in range(3):
        scores = candidates[b] @ z_t[b]
        torch.testing.assert_close(chosen[b], candidates[b, int(scores.argmax())])
    sampler = PriorSampler(tiny_prior(tokens=False), FrozenText(), {"steps": 3, "candidates": 4})
    captions = ["a", "b", "c"]
    all_candidates = sampler.candidates(z_t, captions, [0, 1, 2])
    assert all_candidates.shape == (3, 4, 8)
    torch.testing.assert_close(sampler.sample(z_t, captions, [0, 1, 2]), best_of(all_candidates, z_t))


def test_ema_update_moves_towards_the_live_weights_at_the_warmed_up_decay():
    ema, live = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = [p.detach().clone() for p in ema.parameters()]
    ema_update(ema, live, step=0, decay=0.999)  # warm-up: decay (1 + 0) / (10 + 0) = 0.1
    for e, b, p in zip(ema.parameters(), before, live.parameters()):
        torch.testing.assert_close(e, 0.1 * b + 0.9 * p)
    before = [p.detach().clone() for p in ema.parameters()]
    ema_update(ema, live, step=100_000, decay=0.999)
    for e, b, p in zip(ema.parameters(), before, live.parameters()):
        torch.testing.assert_close(e, 0.999 * b + 0.001 * p)


def test_warmup_then_cosine_decay_to_the_floor():
    assert warmup_cosine(0, 10, 110) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 110) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 110) == pytest.approx(1.0)
    assert warmup_cosine(60, 10, 110) == pytest.approx(0.05 + 0.95 * 0.5)
    assert warmup_cosine(110, 10, 110) == pytest.approx(0.05)
    assert warmup_cosine(500, 10, 110) == pytest.approx(0.05)


def test_slerp_ends_on_its_endpoints_stays_on_the_sphere_and_halves_the_angle():
    a, b = F.normalize(torch.randn(2, 6, generator=torch.Generator().manual_seed(4)), dim=-1)
    path = slerp(a, b, torch.linspace(0, 1, 5))
    torch.testing.assert_close(path[0], a, atol=1e-6, rtol=0)
    torch.testing.assert_close(path[-1], b, atol=1e-6, rtol=0)
    torch.testing.assert_close(path.norm(dim=-1), torch.ones(5), atol=1e-6, rtol=0)
    torch.testing.assert_close(path[2], F.normalize(a + b, dim=-1), atol=1e-6, rtol=0)  # θ = 0.5: the bisector
    angles = torch.arccos((path[:-1] * path[1:]).sum(-1))
    torch.testing.assert_close(angles, angles[:1].expand(4), atol=1e-5, rtol=0)  # equal steps along the arc


def test_gaussian_blur_keeps_flat_images_and_the_mean_and_sigma_zero_is_the_identity():
    images = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(5))
    flat = torch.full((1, 3, 12, 12), 0.3)
    torch.testing.assert_close(gaussian_blur(flat, torch.tensor([0.8])), flat)
    blurred = gaussian_blur(images, torch.tensor([0.8, 0.5]))
    torch.testing.assert_close(blurred.mean((2, 3)), images.mean((2, 3)), atol=0.01, rtol=0)
    assert blurred.std() < images.std()
    torch.testing.assert_close(gaussian_blur(images, torch.zeros(2)), images, atol=1e-6, rtol=0)


def test_the_schedule_runs_from_almost_clean_to_almost_pure_noise():
    alphas = noise_schedule().alphas_cumprod
    assert len(alphas) == 1000 and bool((alphas[1:] < alphas[:-1]).all())
    assert 0.9999 < float(alphas[0]) < 1.0 and float(alphas[-1]) < 1e-4


def test_training_loads_only_the_clip_that_made_the_embeddings(tiny_clip_dir):
    """The trainers encode captions with the CLIP of the manifest: another checksum, or none named, is refused."""
    from embeddings.config import ConfigError
    from training.conditioning import load_clip

    encoder = load_clip({"model": str(tiny_clip_dir)})
    assert load_clip({"model": str(tiny_clip_dir), "checksum": encoder.checksum}) is encoder  # loaded once
    with pytest.raises(ConfigError, match="is not the one the embeddings were made with"):
        load_clip({"model": str(tiny_clip_dir), "checksum": "0" * 64})
    with pytest.raises(ConfigError, match="manifest names none"):
        load_clip({"model": None, "checksum": "unknown (imported)"})


def test_the_variational_bound_term_is_zero_for_the_true_reverse_step_and_trains_only_the_variance():
    """vlb_term (the learned variance's loss): KL 0 where ε is the true noise and the variance is the posterior's
    (values -1 = log β̃_t) for t > 0; larger for a wrong variance; its gradient reaches the variance values and not
    ε (Improved DDPM's stop-gradient); and the log variance spans [log β̃_t, log β_t] as UnCLIPScheduler reads it."""
    from diffusers import UnCLIPScheduler

    from training.diffusion import model_log_variance, predicted_x0, vlb_term

    from training.diffusion import posterior

    schedule = noise_schedule("epsilon")
    g = torch.Generator().manual_seed(0)
    x_0 = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(x_0.shape, generator=g)
    t = torch.tensor([1, 10, 500, 999])
    x_t = schedule.add_noise(x_0, noise, t)
    # the posterior mean given x_0 equals DDPM's ε form of the reverse mean (Ho et al. 2020, eq. 11)
    abar, beta = schedule.alphas_cumprod[t].view(-1, 1, 1, 1), schedule.betas[t].view(-1, 1, 1, 1)
    ddpm_mean = (x_t - beta / (1 - abar).sqrt() * noise) / (1 - beta).sqrt()
    torch.testing.assert_close(posterior(schedule, x_0, x_t, t)[0], ddpm_mean, atol=1e-4, rtol=1e-4)
    x_0_hat = predicted_x0(schedule, noise, x_t, t, "epsilon")  # the exact ε gives back x_0
    torch.testing.assert_close(x_0_hat, x_0, atol=1e-2, rtol=0)  # float32, amplified by 1/√ᾱ at t = 999
    assert predicted_x0(schedule, x_0, x_t, t, "sample") is x_0
    exact = vlb_term(schedule, x_0_hat, -torch.ones_like(x_0), x_0, x_t, t)
    assert exact.abs().max() < 1e-6
    wrong = vlb_term(schedule, x_0_hat, torch.ones_like(x_0), x_0, x_t, t)  # log β_t: β_t ≈ β̃_t for large t
    assert (wrong[:2] > 1e-3).all() and (wrong >= exact - 1e-6).all()
    eps, values = noise.clone().requires_grad_(), torch.zeros_like(x_0, requires_grad=True)
    vlb_term(schedule, predicted_x0(schedule, eps, x_t, t, "epsilon"), values, x_0, x_t, t).sum().backward()
    assert eps.grad is None and values.grad.abs().sum() > 0
    # t = 0: the discretised likelihood of 8-bit x_0. With the exact ε the mean is x_0, so each interior pixel's
    # probability is the Gaussian mass of its bin, 2Φ(h/σ) − 1 with h = 1/255 and σ² = β̃_1
    on_grid = (torch.round((x_0 + 1) * 127.5) / 127.5 - 1).clamp(-0.99, 0.99)
    zero = torch.zeros(4, dtype=torch.long)
    x_1 = schedule.add_noise(on_grid, noise, zero)
    nll = vlb_term(
        schedule, predicted_x0(schedule, noise, x_1, zero, "epsilon"), -torch.ones_like(x_0), on_grid, x_1, zero
    )
    a = schedule.alphas_cumprod.double()
    sigma = (schedule.betas[1].double() * (1 - a[0]) / (1 - a[1])).sqrt().float()
    bits = -torch.log2(2 * torch.special.ndtr(torch.tensor(1 / 255) / sigma) - 1)
    torch.testing.assert_close(nll, bits.expand(4).float(), atol=0.01, rtol=0)
    off = predicted_x0(schedule, noise + 0.5, x_1, zero, "epsilon")
    assert (vlb_term(schedule, off, -torch.ones_like(x_0), on_grid, x_1, zero) > nll + 0.2).all()
    karlo = UnCLIPScheduler(variance_type="learned_range", prediction_type="epsilon")
    for step in (10, 500):
        v = torch.tensor([-0.5, 0.3])
        ours = model_log_variance(schedule, v[:, None], torch.tensor([step, step]))[:, 0]
        theirs = karlo._get_variance(step, predicted_variance=v, prev_timestep=step - 1)
        torch.testing.assert_close(ours, theirs.float(), atol=1e-4, rtol=1e-4)


def test_the_variance_range_penalty_is_zero_inside_the_range_and_pulls_values_back_into_it():
    """variance_range_penalty: nothing for values in [-1, 1] (where UnCLIPScheduler's interpolation is defined),
    the mean squared excess outside, per row, and a gradient that points back towards the range."""
    from training.diffusion import variance_range_penalty

    inside = torch.tensor([[-1.0, -0.3, 0.0, 1.0]]).view(1, 4, 1, 1)
    assert variance_range_penalty(inside).item() == 0
    values = torch.tensor([[-3.0, 0.5, 2.0, 1.5], [0.0, 0.0, 0.0, 0.0]]).view(2, 4, 1, 1).requires_grad_()
    penalty = variance_range_penalty(values)
    torch.testing.assert_close(penalty, torch.tensor([(4 + 0 + 1 + 0.25) / 4, 0.0]))
    penalty.sum().backward()
    grad = values.grad.view(2, 4)
    assert grad[0, 0] < 0 and grad[0, 1] == 0 and grad[0, 2] > 0 and grad[0, 3] > 0  # descent moves them inwards
    assert (grad[1] == 0).all()


def test_v_weight_makes_an_epsilon_or_x0_loss_the_v_loss_and_caps_it():
    """‖v − v̂‖² = v_weight · ‖ε − ε̂‖² for an ε network and v_weight · ‖x_0 − x̂_0‖² for an x_0 one (uncapped), with
    v̂ derived from the network's prediction; the cap bounds the weight where it grows without limit."""
    from training.diffusion import predicted_x0, v_weight

    schedule = noise_schedule("epsilon")
    g = torch.Generator().manual_seed(0)
    x_0, noise = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1, torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([5, 300, 700, 950])
    x_t = schedule.add_noise(x_0, noise, t)
    abar = schedule.alphas_cumprod[t].view(-1, 1, 1, 1).double()
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    v = schedule.get_velocity(x_0, noise, t).double()
    per_row = lambda e: (e.double() ** 2).mean(dim=(1, 2, 3))  # noqa: E731
    eps_hat = noise + 0.1 * torch.randn(x_0.shape, generator=g)
    v_hat = alpha * eps_hat - sigma * predicted_x0(schedule, eps_hat, x_t, t, "epsilon").double()
    torch.testing.assert_close(
        per_row(v_hat - v),
        v_weight(schedule, t, 1e12, "epsilon").double() * per_row(eps_hat - noise),
        rtol=1e-3,
        atol=0,
    )
    x_0_hat = x_0 + 0.1 * torch.randn(x_0.shape, generator=g)
    v_hat = alpha * (x_t.double() - alpha * x_0_hat) / sigma - sigma * x_0_hat
    torch.testing.assert_close(
        per_row(v_hat - v), v_weight(schedule, t, 1e12, "sample").double() * per_row(x_0_hat - x_0), rtol=1e-3, atol=0
    )
    capped = v_weight(schedule, torch.tensor([0, 999]), 20.0, "epsilon")
    assert capped[1] == 20.0 and capped[0] == pytest.approx(1.0, abs=1e-3)
