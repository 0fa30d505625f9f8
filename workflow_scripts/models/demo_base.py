"""Pretrain the demo's base model: a tiny Stable Diffusion 1.5-architecture model that, like SD 1.5,
knows what a film looks like and nothing of the labels (the stage CLI of `snakemake pretrain_demo_base`).

    python -m workflow_scripts.models.demo_base --out results/models/demo-base [--films 4000 --unet-steps 4000 ...]

The shipped copy lives in `resources/demo-base/` (the demo's `model.pretrained`); this command rebuilds it
from scratch. Read top to bottom:
1. films: phantom patients drawn with the recipe's own seed (never the demo dataset's patients), one
   film each, findings mixed in as often as in the demo, and never named: each film's caption says
   only how it looks ("A chest X-ray, slim, dark"), so the base can draw every finding and read a
   prompt, but cannot be asked for a finding;
2. the VAE: trained to reconstruct the films (L1 + MSE, a small KL term, as SD's autoencoder);
   its `scaling_factor` set so that scaled latents have unit variance (SD 1.5's 0.18215 is the same idea);
3. the UNet: the denoising loss on the cached latents under SD 1.5's noise schedule, min-SNR weighted,
   the caption dropped 10 % of the time (the empty prompt of classifier-free guidance), EMA weights kept;
   first under the one caption "A chest X-ray" (what a film looks like), then under the look captions
   (reading the prompt: a base whose cross-attention never mattered cannot be taught a label by a LoRA
   in the demo's few steps, where SD 1.5, trained on captions, can);
4. the text encoder and tokenizer stay as `tiny_model` builds them (random, frozen: it tells words apart);
5. the folder in diffusers layout, with `pretraining.json`: the recipe, versions, seconds per phase and
   the sha256 of every file (`verify_fingerprint` checks a shipped copy against it).
"""

from __future__ import annotations

import argparse
import collections
import copy
import hashlib
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from workflow_scripts.common.errors import UserError, run_stage

FINGERPRINT_FILE = "pretraining.json"
SHIPPED_DIR = Path(__file__).resolve().parents[2] / "resources" / "demo-base"


@dataclass(frozen=True)
class Recipe:
    """Everything that defines the base (the defaults made the shipped one)."""

    films: int = 3000  # phantom patients, one film each
    size: int = 96  # phantom side in px, as the demo draws them (then resized like training images)
    resolution: int = 64  # model side in px (the demo's model.resolution)
    seed: int = 20261205  # own seed: the demo dataset's patients are never drawn
    caption: str = "A chest X-ray"
    caption_dropout: float = 0.1
    unet_blocks: tuple[int, ...] = (32, 64)
    unet_heads: int = 2  # 16-dim heads: faster on a CPU than SD's 8 heads at this width
    vae_blocks: tuple[int, ...] = (16, 32, 64)  # 64 px -> 16 x 16 latents; a narrow first level halves its time
    vae_steps: int = 600
    vae_batch: int = 32
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    unet_steps: int = 2400  # under the one caption
    caption_steps: int = 800  # then under look captions (slim/broad, dark/bright, soft/sharp, smooth/grainy)
    unet_batch: int = 64
    unet_lr: float = 1e-3
    warmup_steps: int = 100
    snr_gamma: float = 5.0
    ema_decay: float = 0.999


# ----------------------------------------------------------------------------- 1. films


def _draw(job: tuple[int, int, int, list[str]]) -> tuple[np.ndarray, str]:
    from workflow_scripts.data.phantom import _film_jitter, draw_phantom, sample_anatomy

    seed, patient, size, labels = job
    film = draw_phantom(labels, size, np.random.default_rng([seed, 7, patient]))
    # the same draws draw_phantom made: the film's anatomy and exposure, for its caption
    anatomy_seed, film_seed, _ = np.random.default_rng([seed, 7, patient]).integers(0, 2**63 - 1, size=3)
    return film, look_caption(sample_anatomy(np.random.default_rng(int(anatomy_seed))),
                              _film_jitter(np.random.default_rng(int(film_seed))))


def look_caption(anatomy: dict, film: dict) -> str:
    """What the film looks like, never what it shows: body size, exposure, contrast and grain, each
    named only at its extremes (a third of films each way). Like the alt texts SD 1.5 learned from,
    these teach the UNet to read the prompt; the labels' words never appear."""
    words = []
    for value, low, high, (small, large) in (
        (anatomy["body_hw"], 0.4533, 0.4767, ("slim", "broad")),
        (anatomy["brightness"] + film["exposure"], -0.0167, 0.0167, ("dark", "bright")),
        (anatomy["contrast"] * film["contrast"], 0.9667, 1.0333, ("soft", "sharp")),
        (anatomy["noise"], 0.014, 0.018, ("smooth", "grainy")),
    ):
        if value < low:
            words.append(small)
        elif value > high:
            words.append(large)
    return "A chest X-ray" + ("".join(f", {word}" for word in words))


def draw_films(recipe: Recipe, workers: int = 2) -> tuple[torch.Tensor, list[str]]:
    """The pretraining films as model inputs (N x 3 x res x res in [-1, 1]), resized exactly like training
    images (`xray_dataset.model_transform`), and each film's look caption."""
    from multiprocessing import get_context

    from PIL import Image

    from workflow_scripts.data.phantom_patients import plan_patients
    from workflow_scripts.data.xray_dataset import model_transform

    plan = plan_patients(recipe.films, np.random.default_rng([recipe.seed, 0]))
    jobs = [(recipe.seed, patient, recipe.size, labels) for patient, labels in enumerate(plan)]
    with get_context("fork").Pool(workers) as pool:
        drawn = list(tqdm(pool.imap(_draw, jobs, chunksize=32), total=len(jobs), desc="drawing films", unit="film",
                          file=sys.stderr))
    transform = model_transform(recipe.resolution)
    return torch.stack([transform(Image.fromarray(a)) for a, _ in drawn]), [caption for _, caption in drawn]


# ----------------------------------------------------------------------------- 2. VAE


def cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_vae(vae, films: torch.Tensor, recipe: Recipe, generator: torch.Generator) -> list[float]:
    """Reconstruction (L1 + MSE) plus a small KL term; returns the loss every 50 steps."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_lr(s, recipe.vae_steps, recipe.warmup_steps))
    vae.train()
    losses = []
    for step in tqdm(range(recipe.vae_steps), desc="VAE", unit="step", file=sys.stderr):
        batch = films[torch.randint(len(films), (recipe.vae_batch,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample(generator)).sample
        loss = F.l1_loss(recon, batch) + F.mse_loss(recon, batch) + recipe.kl_weight * posterior.kl().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == recipe.vae_steps - 1:
            losses.append(round(loss.item(), 5))
    vae.eval()
    return losses


@torch.no_grad()
def encode(vae, films: torch.Tensor, batch: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for start in range(0, len(films), batch):
        dist = vae.encode(films[start:start + batch]).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


# ----------------------------------------------------------------------------- 3. UNet


def train_unet(unet, mean: torch.Tensor, std: torch.Tensor, scaling: float, embeds: torch.Tensor, captions: torch.Tensor,
               scheduler, steps: int, recipe: Recipe, generator: torch.Generator) -> tuple[torch.nn.Module, list[float]]:
    """The denoising loss (epsilon target, min-SNR weighted) on cached latents. `embeds`: the distinct
    captions' embeddings, the last one the empty prompt; `captions`: each film's row in it.
    Returns the EMA UNet and the loss every 50 steps."""
    from diffusers.training_utils import compute_snr

    unet.requires_grad_(True)  # a phase may start from the previous phase's EMA copy
    ema = copy.deepcopy(unet).requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=recipe.unet_lr, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_lr(s, steps, recipe.warmup_steps))
    unet.train()
    losses, running = [], []
    for step in tqdm(range(steps), desc="UNet", unit="step", file=sys.stderr):
        rows = torch.randint(len(mean), (recipe.unet_batch,), generator=generator)
        latents = (mean[rows] + std[rows] * torch.randn(mean[rows].shape, generator=generator)) * scaling
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (recipe.unet_batch,), generator=generator)
        dropped = torch.rand(recipe.unet_batch, generator=generator) < recipe.caption_dropout
        rows_embeds = embeds[torch.where(dropped, len(embeds) - 1, captions[rows])]
        prediction = unet(scheduler.add_noise(latents, noise, t), t, rows_embeds).sample
        per_image = F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3))
        snr = compute_snr(scheduler, t)
        loss = (per_image * torch.clamp(snr, max=recipe.snr_gamma) / snr).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        decay = min(recipe.ema_decay, (1 + step) / (10 + step))  # EMA warm-up, as diffusers' EMAModel
        with torch.no_grad():
            for e, p in zip(ema.parameters(), unet.parameters()):
                e.lerp_(p, 1 - decay)
        running.append(per_image.mean().item())
        if step % 50 == 0 or step == steps - 1:
            losses.append(round(float(np.mean(running)), 5))
            running = []
    return ema.eval(), losses


# ----------------------------------------------------------------------------- 5. the folder


def file_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file() and p.name != FINGERPRINT_FILE}


def verify_fingerprint(folder: Path) -> list[str]:
    """Files that differ from, are missing from or were added to the recorded fingerprint (empty: intact)."""
    recorded = json.loads((Path(folder) / FINGERPRINT_FILE).read_text())["files"]
    found = file_hashes(folder)
    return sorted({name for name in recorded.keys() | found.keys() if recorded.get(name) != found.get(name)})


def versions() -> dict[str, str]:
    import diffusers
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "numpy": np.__version__}


def pretrain(out_dir: Path, recipe: Recipe, threads: int | None = None, resume: Path | None = None) -> dict:
    """Build the base into `out_dir`, from scratch or, with `resume`, from a base of the same recipe whose
    VAE and first UNet phase are done (their weights, seconds and losses are taken from it). Returns what
    `pretraining.json` records."""
    from workflow_scripts.models.base_model import sd15_noise_scheduler
    from workflow_scripts.models.tiny_model import model_info, save_pipeline, tiny_parts

    if threads:
        torch.set_num_threads(threads)
    record: dict = {"seconds": {}, "resumed_from": None}
    if resume is not None:
        record = resumed_record(resume, recipe)
    clock = time.perf_counter()
    films, looks = draw_films(recipe)
    record["seconds"]["draw_films"] = round(time.perf_counter() - clock, 1)
    parts = tiny_parts((recipe.caption,), recipe.resolution, recipe.seed, recipe.unet_blocks, recipe.unet_heads,
                       recipe.vae_blocks)
    generator = torch.Generator().manual_seed(recipe.seed)  # the VAE and the first UNet phase

    if resume is None:  # 2. the VAE, and its latent scaling
        clock = time.perf_counter()
        record["vae_loss_every_50"] = train_vae(parts["vae"], films, recipe, generator)
        mean, std = encode(parts["vae"], films)
        record["seconds"]["vae"] = round(time.perf_counter() - clock, 1)
        record["vae_scaling_factor"] = round(1.0 / float((mean + std * torch.randn(mean.shape, generator=generator)).std()), 5)
        parts["vae"].register_to_config(scaling_factor=record["vae_scaling_factor"])
    else:
        from diffusers import AutoencoderKL, UNet2DConditionModel

        parts["vae"] = AutoencoderKL.from_pretrained(resume, subfolder="vae")
        parts["unet"] = UNet2DConditionModel.from_pretrained(resume, subfolder="unet")
        mean, std = encode(parts["vae"], films)
    scaling, scheduler = parts["vae"].config.scaling_factor, sd15_noise_scheduler()

    if resume is None:  # 3a. the UNet under one caption: what a film looks like
        embeds, rows = caption_embeddings(parts, [recipe.caption] * len(films))
        clock = time.perf_counter()
        parts["unet"], record["unet_loss_every_50"] = train_unet(parts["unet"], mean, std, scaling, embeds, rows, scheduler,
                                                                 recipe.unet_steps, recipe, generator)
        record["seconds"]["unet"] = round(time.perf_counter() - clock, 1)
    # 3b. the UNet under look captions: reading the prompt (its own generator: a resumed run matches)
    embeds, rows = caption_embeddings(parts, looks)
    clock = time.perf_counter()
    parts["unet"], record["caption_loss_every_50"] = train_unet(parts["unet"], mean, std, scaling, embeds, rows, scheduler,
                                                                recipe.caption_steps, recipe,
                                                                torch.Generator().manual_seed(recipe.seed + 2))
    record["seconds"]["captions"] = round(time.perf_counter() - clock, 1)

    info = model_info(parts, "tiny Stable Diffusion 1.5-architecture base pretrained on unlabelled phantom films "
                             "(demo only: phantoms are not medical data)", recipe.seed, recipe.resolution)
    save_pipeline(out_dir, parts, info)
    record.update({
        "recipe": recipe_dict(recipe),
        "command": " ".join(["python -m workflow_scripts.models.demo_base --out DIR", *recipe_flags(recipe)]),
        "captions": dict(sorted(collections.Counter(looks).most_common(8))),
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "versions": versions(),
    })
    record["files"] = file_hashes(out_dir)
    record["bytes"] = sum((out_dir / name).stat().st_size for name in record["files"])
    (out_dir / FINGERPRINT_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


def caption_embeddings(parts: dict, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct captions' text embeddings with the empty prompt last, and each film's row."""
    distinct = sorted(set(captions))
    tokenizer = parts["tokenizer"]
    with torch.no_grad():
        ids = tokenizer([*distinct, ""], padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        embeds = parts["text_encoder"](ids)[0]
    index = {caption: k for k, caption in enumerate(distinct)}
    return embeds, torch.tensor([index[caption] for caption in captions])


def recipe_dict(recipe: Recipe) -> dict:
    return {**asdict(recipe), "unet_blocks": list(recipe.unet_blocks), "vae_blocks": list(recipe.vae_blocks)}


def resumed_record(folder: Path, recipe: Recipe) -> dict:
    """The record of a base whose VAE and first UNet phase this recipe would repeat exactly."""
    path = Path(folder) / FINGERPRINT_FILE
    if not path.is_file():
        raise UserError(f"--resume {folder}: no {FINGERPRINT_FILE}; resume from a base this command built")
    done = json.loads(path.read_text())
    mine = recipe_dict(recipe)
    differ = [key for key in mine if key not in ("caption_steps",) and done["recipe"].get(key, mine[key]) != mine[key]]
    if differ:
        raise UserError(f"--resume {folder}: made under another recipe ({', '.join(differ)} differ)")
    return {"seconds": {key: done["seconds"][key] for key in ("vae", "unet")}, "resumed_from": str(folder),
            **{key: done[key] for key in ("vae_loss_every_50", "unet_loss_every_50", "vae_scaling_factor")}}


def recipe_flags(recipe: Recipe) -> list[str]:
    default = Recipe()
    return [f"--{k.replace('_', '-')} {v}" for k, v in asdict(recipe).items()
            if k in FLAG_KEYS and v != getattr(default, k)]


FLAG_KEYS = ("films", "seed", "vae_steps", "unet_steps", "caption_steps", "vae_batch", "unet_batch")


@run_stage
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workflow_scripts.models.demo_base", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder to write the base into (diffusers layout)")
    parser.add_argument("--verify", action="store_true", help="only check --out against its recorded fingerprint")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--resume", type=Path, default=None,
                        help="a base of the same recipe whose VAE and first UNet phase are done: run only the rest")
    for key in FLAG_KEYS:
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=getattr(Recipe(), key))
    args = parser.parse_args(argv)
    if args.verify:
        if not (args.out / FINGERPRINT_FILE).is_file():
            raise UserError(f"{args.out}: no {FINGERPRINT_FILE}; is this a base built by this command?")
        changed = verify_fingerprint(args.out)
        if changed:
            raise UserError(f"{args.out}: {len(changed)} file(s) differ from {FINGERPRINT_FILE}: {', '.join(changed)}")
        print(f"{args.out}: every file matches {FINGERPRINT_FILE}")
        return 0
    recipe = Recipe(**{key: getattr(args, key) for key in FLAG_KEYS})
    record = pretrain(args.out, recipe, args.threads, args.resume)
    print(f"pretrained the demo base in {sum(record['seconds'].values()):.0f} s ({record['seconds']}), "
          f"{record['bytes'] / 2**20:.2f} MiB, at {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
