"""Generation: text → image end to end, and the three other uses of unCLIP's latent space (§3).

`UnCLIP.load(models/<name>)` reads the exported prior/, decoder/ and upsampler/ (each records the
checksum of the CLIP it was trained against) and the CLIP itself, from the record's model and
weights; a component trained against another CLIP is a clear error. Every method returns uint8
images (N, H, W, 3); sample i of a call draws from the streams of seed + i (the same seed gives the
same image; the prior, decoder and upsampler of one sample draw from streams of their own), and
interpolations and text diffs keep one decoder noise along their path, as the paper does, so only
the embedding changes. Nothing here imports Lightning: exports load as plain samplers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from embeddings.config import ConfigError
from training.grid import to_uint8


def slerp(a: torch.Tensor, b: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between unit vectors a and b (D,) at fractions theta (N,) → (N, D)."""
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    omega = torch.arccos((a * b).sum().clamp(-1 + 1e-7, 1 - 1e-7))
    theta = theta.float()[:, None]
    return (torch.sin((1 - theta) * omega) * a + torch.sin(theta * omega) * b) / torch.sin(omega)


class UnCLIP:
    """The trained system: CLIP, prior, decoder and (optionally) upsampler, loaded from one folder."""

    def __init__(self, encoder, decoder, prior=None, upsampler=None, upsampler_embedding: bool = True):
        """`upsampler_embedding` False: an embedding-conditioned upsampler gets the zeroed embedding."""
        self.encoder, self.decoder, self.prior, self.upsampler = encoder, decoder, prior, upsampler
        self.upsampler_embedding = upsampler_embedding
        self.raw = bool(decoder.config.raw)  # the decoder reads raw CLIP vectors (Karlo's layout)
        if self.raw and decoder.condition == "image" and prior is not None and not prior.config.raw:
            raise ConfigError(
                "the decoder reads raw CLIP vectors (Karlo's layout) and the prior gives unit ones (clip_space unit): "
                "retrain the prior with prior.clip_space: raw"
            )

    @classmethod
    def load(cls, folder: str | Path, decoder: str = "decoder", device: str = "cpu") -> UnCLIP:
        """Load models/<name>/: its `decoder` export (or decoder-text), prior/ and upsampler/ where present."""
        from embeddings.encoders import load_encoder
        from training.export import load_decoder, load_export, load_prior, load_upsampler

        folder = Path(folder)
        config, _ = load_export(folder / decoder, "decoder")
        clip = config["clip"]
        spec = {k: clip[k] for k in ("model", "weights", "pretrained") if clip.get(k) is not None}
        try:
            encoder = load_encoder(dict(spec, device=device, precision="fp32"))
        except (ConfigError, FileNotFoundError, RuntimeError) as err:
            raise ConfigError(
                f"cannot load the CLIP the decoder in {folder / decoder} was trained against ({spec}): {err}"
            ) from err
        checksum = encoder.checksum
        if clip.get("checksum") and clip["checksum"] != checksum:
            raise ConfigError(
                f"the CLIP at {spec.get('model')} (checksum {checksum[:12]}…) is not the one the decoder was "
                f"trained against ({clip['checksum'][:12]}…)"
            )
        dec = load_decoder(folder / decoder, checksum, encoder)
        prior = (
            load_prior(folder / "prior", checksum, encoder) if (folder / "prior" / "config.json").is_file() else None
        )
        up = (
            load_upsampler(folder / "upsampler", checksum) if (folder / "upsampler" / "config.json").is_file() else None
        )
        for component in (dec, prior, up):
            if component is not None:
                component.net.to(device)
        return cls(encoder, dec, prior, up)

    # -- the two stages ---------------------------------------------------------------------------------

    def embed_texts(self, texts: list[str], raw: bool = False) -> torch.Tensor:
        """CLIP text embeddings (N, D): unit, or with `raw` the CLIP's raw vectors."""
        unit, norms = self.encoder.encode_texts(list(texts), norms=True)
        return unit * norms[:, None] if raw else unit

    def embed_images(self, images: list, raw: bool = False) -> torch.Tensor:
        """CLIP image embeddings (N, D) of image paths, bytes or (H, W, 3) uint8 arrays: unit, or with `raw` the
        CLIP's raw vectors."""
        from training.data import decode_image

        arrays = []
        for image in images:
            if isinstance(image, (str, Path)):
                if not Path(image).is_file():
                    raise FileNotFoundError(f"image not found: {image}")
                image = Path(image).read_bytes()
            arrays.append(np.asarray(decode_image(image)) if isinstance(image, bytes) else np.asarray(image, np.uint8))
        unit, norms = self.encoder.encode_images(self.encoder.preprocess_on_device(arrays), norms=True)
        return unit * norms[:, None] if raw else unit

    def decode(
        self,
        z: torch.Tensor,
        seeds: list[int],
        captions: list[str] | None = None,
        guidance_scale: float | None = None,
        steps: int | None = None,
        upsample: bool = True,
        upsampler_steps: int | None = None,
    ) -> np.ndarray:
        """CLIP vectors (N, D) in the decoder's space (raw for Karlo's layout, `self.raw`) → uint8 images: the
        decoder, then the upsampler when there is one."""
        images = self.decoder.sample(z, seeds, captions, steps=steps, guidance_scale=guidance_scale)
        if upsample and self.upsampler is not None:
            # The upsampler reads the unit CLIP image embedding where it has one; a text-conditioned decoder
            # (the baseline) has none, so its upsampler input is the zeroed embedding.
            z_i = (
                F.normalize(z.float(), dim=-1)
                if self.decoder.condition == "image" and self.upsampler_embedding
                else None
            )
            images = self.upsampler.sample(images, seeds, z_i, steps=upsampler_steps)
        return to_uint8(images)

    def prior_embeddings(
        self, prompts: list[str], seeds: list[int], prior_guidance: float | None = None
    ) -> torch.Tensor:
        """The prior's image embeddings (N, D) for prompts, in the decoder's space."""
        if self.prior is None:
            raise FileNotFoundError("no prior in the model folder: run `make train-prior` first")
        return self.prior.sample(self.embed_texts(prompts), prompts, seeds, guidance_scale=prior_guidance, raw=self.raw)

    # -- the four uses ----------------------------------------------------------------------------------

    def text_to_image(
        self,
        prompts: list[str],
        n: int = 4,
        seed: int = 0,
        prior_guidance: float | None = None,
        z: torch.Tensor | None = None,
        **decode,
    ) -> np.ndarray:
        """n images per prompt (prompt-major): text → prior → decoder → upsampler.

        A decoder conditioned on text (the GLIDE-like baseline) skips the prior; `z` (len(prompts)·n, D), in the
        decoder's space, is decoded in place of the prior's samples, with the same seeds (the decoder judged alone)."""
        prompts = [p for p in prompts for _ in range(n)]
        seeds = [seed + i for i in range(len(prompts))]
        if z is None and self.decoder.condition == "text":
            z = self.embed_texts(prompts, raw=self.raw)
        elif z is None:
            z = self.prior_embeddings(prompts, seeds, prior_guidance)
        return self.decode(z, seeds, prompts, **decode)

    def variations(self, image, n: int = 8, seed: int = 0, **decode) -> np.ndarray:
        """n decodings of one image's CLIP embedding, each from fresh noise."""
        z = self.embed_images([image], raw=self.raw).repeat(n, 1)
        return self.decode(z, [seed + i for i in range(n)], **decode)

    def interpolate(self, a, b, n: int = 8, seed: int = 0, **decode) -> np.ndarray:
        """Decodings of slerp(z_a, z_b, θ) for θ from 0 to 1 in n steps, all from the noise of `seed`."""
        z_a, z_b = self.embed_images([a, b], raw=self.raw)
        theta = torch.linspace(0, 1, n)
        z = slerp(z_a, z_b, theta)
        if self.raw:  # the direction slerped, the norm interpolated linearly
            z = z * torch.lerp(z_a.norm(), z_b.norm(), theta)[:, None]
        return self.decode(z, [seed] * n, **decode)

    def textdiff(
        self, image, from_text: str, to_text: str, n: int = 6, max_theta: float = 0.5, seed: int = 0, **decode
    ) -> np.ndarray:
        """Decodings of the image embedding rotated towards the text diff z_d = norm(z_t(to) − z_t(from)):
        slerp(z_i, z_d, θ) for θ from 0 to max_theta, all from the noise of `seed`."""
        z_i = self.embed_images([image], raw=self.raw)[0]
        z_from, z_to = self.embed_texts([from_text, to_text])
        z_d = F.normalize(z_to - z_from, dim=-1)
        z = slerp(z_i, z_d, torch.linspace(0, max_theta, n))
        if self.raw:  # rotated, keeping the image embedding's norm
            z = z * z_i.norm()
        return self.decode(z, [seed] * n, **decode)


def sample_prior(
    prompts: list[str],
    prior_dir: str | Path,
    embeddings_dir: str | Path,
    *,
    seed: int = 0,
    steps: int | None = None,
    guidance_scale: float | None = None,
    candidates: int | None = None,
) -> np.ndarray:
    """Text → (N, D) unit CLIP image embeddings, with the CLIP that made `embeddings_dir` (checked);
    prompt i draws from the streams of seed + i, as in `UnCLIP.text_to_image`."""
    from embeddings.knn import encoder_from_manifest
    from training.export import load_prior

    encoder = encoder_from_manifest(embeddings_dir)
    prior = load_prior(prior_dir, encoder.checksum, encoder)
    z_t = encoder.encode_texts(list(prompts))
    seeds = [seed + i for i in range(len(prompts))]
    z_i = prior.sample(z_t, list(prompts), seeds, steps=steps, guidance_scale=guidance_scale, candidates=candidates)
    return z_i.cpu().numpy()
