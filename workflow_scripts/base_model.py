"""Base Stable Diffusion model: an offline "tiny" SD 1.5 look-alike and clear-error loading.

Two jobs:

1. ``build_tiny_pipeline`` builds a *small, randomly initialised* pipeline with the same component
   classes as Stable Diffusion 1.5 (``UNet2DConditionModel`` with cross-attention blocks,
   ``AutoencoderKL``, ``CLIPTextModel`` + ``CLIPTokenizer``, SD 1.5's DDPM noise schedule) and saves it in
   the diffusers folder layout.  Everything downstream (LoRA fine-tuning, sampling, evaluation) can then
   run end to end on a CPU without any download: ``StableDiffusionPipeline.from_pretrained(dir)`` and
   ``UNet2DConditionModel.from_pretrained(dir, subfolder="unet")`` work exactly as on a real SD 1.5 folder.
   The weights are random, so images are noise-like: the tiny model checks the *plumbing*, not quality.

2. ``resolve_pretrained`` / ``load_components`` / ``load_pipeline`` load the configured base model
   (``model.pretrained`` in the config): ``tiny``, a local diffusers folder, or a Hugging Face hub id;
   failures become a ``ModelNotFoundError`` that says exactly what to do.

Its command line is the ``build_tiny_model`` stage (``python -m workflow_scripts.build_tiny_model``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Iterable

import torch

from workflow_scripts.errors import ModelNotFoundError

# --------------------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------------------

#: Default location of the tiny model (the ``build_tiny_model`` rule's output).
DEFAULT_TINY_DIR = Path("results/models/tiny-sd")

#: Where the SD 1.5 component configs (no weights) may live: ``shared/`` in or beside the repository.
_REPO_ROOT = Path(__file__).resolve().parents[1]
SD15_ARCH_CANDIDATES = (_REPO_ROOT / "shared" / "sd15-arch", _REPO_ROOT.parent / "shared" / "sd15-arch")

#: SD 1.5's noise schedule (from its scheduler_config.json); used if the shared copy is absent.
SD15_SCHEDULER_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "clip_sample": False,
    "skip_prk_steps": True,
    "trained_betas": None,
}

NIH_LABELS = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis",
    "Hernia", "Infiltration", "Mass", "Nodule", "Pleural_Thickening", "Pneumonia", "Pneumothorax",
    "No Finding",
)
CHEXPERT_LABELS = (
    "Enlarged Cardiomediastinum", "Lung Opacity", "Lung Lesion", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
)
#: The prompt template whose words get whole tokens ("{label}" is replaced by every label).
PROMPT_TEMPLATE = "A chest X-ray with {label} and ..."
#: A few more words and punctuation pieces common in radiograph prompts (cheap to include).
EXTRA_WORDS = (
    "an", "the", "of", "in", "no", "findings", "normal", "frontal", "lateral", "view", "pa", "ap",
    "radiograph", "xray", "image", "photo", "left", "right", "small", "large", "mild", "severe",
    ",", ".", ":", ";", "-", "_", "/", "(", ")", "...",
)

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
MODEL_MAX_LENGTH = 77

# Tiny architecture (SD 1.5 classes and block types, small widths).
TINY_UNET_BLOCK_OUT = (32, 64)
TINY_UNET_HEADS = 8  # diffusers' ``attention_head_dim`` (SD 1.5 uses 8 = number of heads)
TINY_CROSS_ATTENTION_DIM = 32
TINY_VAE_BLOCK_OUT = (32, 64, 64)  # 3 blocks: downsampling factor 4 (64 px -> 16x16 latents)
TINY_TEXT_HIDDEN = 32


@dataclass
class Components:
    """The pieces of a Stable Diffusion model needed for training."""

    tokenizer: Any
    text_encoder: Any
    vae: Any
    unet: Any
    noise_scheduler: Any
    source: str  # the resolved location: a folder path or a hub id
    kind: str = ""  # "tiny", "local" or "hub"


# --------------------------------------------------------------------------------------------------
# Tokenizer files (CLIP byte-level BPE, built from scratch)
# --------------------------------------------------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's / GPT-2's reversible byte -> printable unicode character map (256 entries)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def default_prompt_texts() -> list[str]:
    """The texts whose words get whole tokens by default (label prompts + a few extras)."""
    texts = [PROMPT_TEMPLATE.format(label=label) for label in NIH_LABELS + CHEXPERT_LABELS]
    texts.append(PROMPT_TEMPLATE.format(label=", ".join(NIH_LABELS + CHEXPERT_LABELS)))
    texts.extend(EXTRA_WORDS)
    return texts


def _clip_pieces(texts: Iterable[str]) -> list[str]:
    """Split texts exactly as CLIPTokenizer does before BPE (normalise, regex split, byte-level map).

    Uses the normaliser and pre-tokeniser of a real ``CLIPTokenizer`` so that the vocabulary built from
    these pieces matches what the tokenizer will see: lowercased, "x-ray" -> "x", "-", "ray";
    "pleural_thickening" -> "pleural", "_", "thickening"; digits one by one; byte-level characters.
    """
    from transformers import CLIPTokenizer

    probe = CLIPTokenizer(vocab={BOS_TOKEN: 0, EOS_TOKEN: 1}, merges=[])
    backend = probe.backend_tokenizer
    pieces: set[str] = set()
    for text in texts:
        normalized = backend.normalizer.normalize_str(str(text))
        for piece, _ in backend.pre_tokenizer.pre_tokenize_str(normalized):
            if piece and piece not in (BOS_TOKEN, EOS_TOKEN):
                pieces.add(piece)
    return sorted(pieces)


def _learn_bpe(pieces: Iterable[str]) -> list[tuple[str, str]]:
    """Plain BPE training until every piece is a single symbol (deterministic tie-breaks).

    Symbols follow CLIP's convention: the last character of a word carries ``</w>``.  Because the merges
    are learned the BPE way (most frequent pair first, applied everywhere), encoding a training piece
    with these ranked merges reproduces the training segmentation, i.e. one token per piece.
    """
    words = [tuple(p[:-1]) + (p[-1] + END_OF_WORD,) for p in sorted(set(pieces)) if p]
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter[tuple[str, str]] = Counter()
        for w in words:
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] += 1
        if not pairs:
            return merges
        best_count = max(pairs.values())
        best = min(p for p, c in pairs.items() if c == best_count)
        merges.append(best)
        new_words = []
        for w in words:
            out: list[str] = []
            i = 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words.append(tuple(out))
        words = new_words


def build_clip_vocab(texts: Iterable[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP-style vocab (256 bytes, 256 ``byte</w>``, merged tokens, then BOS/EOS) and merges."""
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + END_OF_WORD for c in byte_chars]
    merges = _learn_bpe(_clip_pieces(texts))
    seen = set(tokens)
    for a, b in merges:
        merged = a + b
        if merged not in seen:
            tokens.append(merged)
            seen.add(merged)
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def write_clip_tokenizer_files(folder: Path, texts: Iterable[str]) -> dict[str, int]:
    """Write ``vocab.json``, ``merges.txt``, ``tokenizer_config.json``, ``special_tokens_map.json``.

    The same file set as SD 1.5's ``tokenizer/`` folder, so ``CLIPTokenizer.from_pretrained`` loads it
    the same way.  Returns the vocabulary.
    """
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_clip_vocab(texts)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    special = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
    }
    config = {
        "add_prefix_space": False,
        "do_lower_case": True,
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "tokenizer_class": "CLIPTokenizer",
        **special,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    return vocab


# --------------------------------------------------------------------------------------------------
# Tiny model
# --------------------------------------------------------------------------------------------------


def sd15_scheduler_config(arch_dir: Path | None = None) -> dict[str, Any]:
    """SD 1.5's scheduler_config.json values (from ``shared/sd15-arch`` when present), minus ``_class_name``."""
    cfg = dict(SD15_SCHEDULER_DEFAULTS)
    candidates = (Path(arch_dir),) if arch_dir is not None else SD15_ARCH_CANDIDATES
    for folder in candidates:
        path = folder / "scheduler" / "scheduler_config.json"
        if path.is_file():
            data = json.loads(path.read_text())
            cfg.update({k: v for k, v in data.items() if not k.startswith("_")})
            break
    return cfg


def sd15_noise_scheduler(arch_dir: Path | None = None):
    """A ``DDPMScheduler`` with SD 1.5's settings (SD 1.5 ships a PNDM config; DDPM is the training one).

    ``from_config`` keeps the PNDM-only keys (``set_alpha_to_one``, ``skip_prk_steps``) in the saved config,
    like ``DDPMScheduler.from_pretrained`` on a real SD 1.5 folder does.
    """
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(sd15_scheduler_config(arch_dir))


def _tiny_unet(sample_size: int):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=TINY_UNET_BLOCK_OUT,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TINY_CROSS_ATTENTION_DIM,
        attention_head_dim=TINY_UNET_HEADS,
        norm_num_groups=32,
        norm_eps=1e-5,
        act_fn="silu",
        flip_sin_to_cos=True,
        freq_shift=0,
        downsample_padding=1,
        center_input_sample=False,
        use_linear_projection=False,
    )


def _tiny_vae(resolution: int):
    from diffusers import AutoencoderKL

    n = len(TINY_VAE_BLOCK_OUT)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=TINY_VAE_BLOCK_OUT,
        layers_per_block=1,
        act_fn="silu",
        latent_channels=4,
        norm_num_groups=32,
        sample_size=resolution,
        scaling_factor=0.18215,
    )


def _tiny_text_encoder(vocab: dict[str, int]):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=TINY_TEXT_HIDDEN,
        intermediate_size=64,
        projection_dim=TINY_TEXT_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MODEL_MAX_LENGTH,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        attention_dropout=0.0,
        dropout=0.0,
        bos_token_id=vocab[BOS_TOKEN],
        eos_token_id=vocab[EOS_TOKEN],
        pad_token_id=vocab[EOS_TOKEN],
    )
    return CLIPTextModel(config)


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _normalize_permissions(folder: Path) -> None:
    """Some writers create files 0600 (temp file + rename); make the model readable as umask allows."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _check_tokenizer(tokenizer, texts: Iterable[str]) -> None:
    """Every CLIP piece of the given texts must be a single token (guards the BPE construction)."""
    for piece in _clip_pieces(texts):
        ids = tokenizer.backend_tokenizer.model.tokenize(piece)
        if len(ids) != 1:
            raise RuntimeError(f"tiny tokenizer splits {piece!r} into {[t.value for t in ids]}")


def build_tiny_pipeline(
    out_dir: Path,
    prompts_words: Iterable[str] = (),
    resolution: int = 64,
    seed: int = 0,
) -> Path:
    """Build the tiny SD 1.5 look-alike (random weights from ``seed``) and save it to ``out_dir``.

    ``prompts_words``: extra words or whole prompts whose words should be single tokens.
    The folder is written atomically: built in a temporary sibling folder, then renamed.
    Returns ``out_dir``.
    """
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    out_dir = Path(out_dir)
    vae_scale_factor = 2 ** (len(TINY_VAE_BLOCK_OUT) - 1)
    if resolution <= 0 or resolution % (vae_scale_factor * 2 ** (len(TINY_UNET_BLOCK_OUT) - 1)):
        raise ValueError(
            f"resolution must be a positive multiple of "
            f"{vae_scale_factor * 2 ** (len(TINY_UNET_BLOCK_OUT) - 1)}, got {resolution}"
        )
    texts = default_prompt_texts() + [str(w) for w in prompts_words]

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tok_src = tmp / "_tokenizer_src"
        vocab = write_clip_tokenizer_files(tok_src, texts)
        tokenizer = CLIPTokenizer.from_pretrained(tok_src)
        _check_tokenizer(tokenizer, texts)

        torch.manual_seed(seed)
        unet = _tiny_unet(resolution // vae_scale_factor)
        torch.manual_seed(seed + 1)
        vae = _tiny_vae(resolution)
        torch.manual_seed(seed + 2)
        text_encoder = _tiny_text_encoder(vocab)
        scheduler = sd15_noise_scheduler()

        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        model_dir = tmp / "model"
        pipe.save_pretrained(model_dir, safe_serialization=True)
        # Tokenizer folder in SD 1.5's own layout (vocab.json + merges.txt, no tokenizer.json).
        shutil.rmtree(model_dir / "tokenizer")
        shutil.copytree(tok_src, model_dir / "tokenizer")
        (model_dir / "tiny_model_info.json").write_text(
            json.dumps(
                {
                    "description": "tiny random-weight Stable Diffusion 1.5 look-alike (offline demo)",
                    "seed": seed,
                    "resolution": resolution,
                    "vae_scale_factor": vae_scale_factor,
                    "params": {
                        "unet": _n_params(unet),
                        "vae": _n_params(vae),
                        "text_encoder": _n_params(text_encoder),
                    },
                    "vocab_size": len(vocab),
                },
                indent=2,
            )
        )

        _normalize_permissions(model_dir)

        # Atomic swap into place.
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "x")
            os.replace(model_dir, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(model_dir, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def _is_diffusers_folder(path: Path) -> bool:
    return (path / "model_index.json").is_file() or (path / "unet" / "config.json").is_file()


def _looks_like_path(s: str) -> bool:
    return (
        s.startswith(("/", "./", "../", "~", "\\"))
        or (len(s) > 1 and s[1] == ":")  # Windows drive
        or s.count("/") > 1
        or s.endswith("/")
    )


def _kind(pretrained: str) -> str:
    if pretrained == "tiny":
        return "tiny"
    if Path(pretrained).expanduser().exists() or _looks_like_path(pretrained):
        return "local"
    return "hub"


def resolve_pretrained(pretrained: str, tiny_dir: Path = DEFAULT_TINY_DIR) -> str:
    """Map ``model.pretrained`` to what ``from_pretrained`` gets: a folder path or a hub id.

    * ``"tiny"`` -> ``tiny_dir`` (must have been built);
    * an existing local folder (or anything that looks like a path) -> that folder, which must be a
      diffusers Stable Diffusion folder (``model_index.json`` or ``unet/config.json``);
    * otherwise a Hugging Face hub id, returned as is.
    """
    pretrained = str(pretrained).strip()
    if not pretrained:
        raise ModelNotFoundError("model.pretrained is empty: set it to 'tiny', a local folder or a hub id")
    kind = _kind(pretrained)
    if kind == "tiny":
        tiny_dir = Path(tiny_dir)
        if not _is_diffusers_folder(tiny_dir):
            raise ModelNotFoundError(
                f"the tiny offline model is not built at '{tiny_dir}'. Build it first: run the "
                f"build_tiny_model rule (snakemake build_tiny_model) or "
                f"`python -m workflow_scripts.build_tiny_model --build-tiny {tiny_dir}`."
            )
        return str(tiny_dir)
    if kind == "local":
        path = Path(pretrained).expanduser()
        if not path.exists():
            raise ModelNotFoundError(
                f"model.pretrained '{pretrained}' looks like a local folder but it does not exist "
                f"(working directory: {Path.cwd()}). " + _download_hint("stable-diffusion-v1-5/stable-diffusion-v1-5", pretrained)
            )
        if not path.is_dir() or not _is_diffusers_folder(path):
            raise ModelNotFoundError(
                f"'{pretrained}' is not a diffusers Stable Diffusion folder: it has neither "
                f"model_index.json nor unet/config.json. Point model.pretrained at the folder that holds "
                f"model_index.json and the unet/, vae/, text_encoder/, tokenizer/, scheduler/ subfolders "
                f"(as downloaded by `huggingface-cli download stable-diffusion-v1-5/stable-diffusion-v1-5 "
                f"--local-dir models/sd15`); single-file .ckpt/.safetensors checkpoints are not supported."
            )
        return str(path)
    return pretrained


def _download_hint(repo_id: str, local_dir: str = "models/sd15") -> str:
    return (
        f"Download it where the network allows: `huggingface-cli download {repo_id} "
        f"--local-dir {local_dir}` (or `hf download {repo_id} --local-dir {local_dir}`), copy the folder "
        f"here and set model.pretrained: {local_dir} in your config; or log in (`huggingface-cli login`) "
        f"if the hub asks for it. For an offline demo use model.pretrained: tiny."
    )


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE as set *now* (huggingface_hub reads them only at import)."""
    if _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover - very old huggingface_hub
        return False


def hub_unreachable_reason(repo_id: str, timeout: float = 10.0) -> str | None:
    """One quick request to the hub (no retries); returns why it failed, or None if it answered.

    huggingface_hub retries connection errors with back-off for every file (minutes when offline), so we
    probe once first and, when the hub is unreachable, load from the local cache only.
    """
    try:
        from huggingface_hub import constants
        from huggingface_hub.utils import get_session

        endpoint = os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/")
        get_session().head(f"{endpoint}/api/models/{repo_id}", timeout=timeout)
        return None  # any HTTP answer (200, 401, 404...) means it is reachable
    except Exception as exc:  # noqa: BLE001 - connection, DNS, proxy, timeout errors
        return f"the Hugging Face hub is unreachable ({type(exc).__name__}: {exc})"


def _quiet_known_warnings() -> None:
    """Silence deprecation noise that diffusers itself triggers in huggingface_hub while loading."""
    warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")


def _load_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError, ValueError, ConnectionError, TimeoutError]
    try:
        from huggingface_hub import errors as hf_errors

        for name in (
            "HfHubHTTPError", "OfflineModeIsEnabled", "EntryNotFoundError", "LocalEntryNotFoundError",
            "RepositoryNotFoundError", "RevisionNotFoundError", "GatedRepoError", "HFValidationError",
        ):
            if hasattr(hf_errors, name):
                errors.append(getattr(hf_errors, name))
    except Exception:  # pragma: no cover
        pass
    for mod_name, attr in (("httpx", "HTTPError"), ("httpx2", "HTTPError"), ("requests", "RequestException")):
        try:
            mod = __import__(mod_name)
            errors.append(getattr(mod, attr))
        except Exception:
            pass
    return tuple(errors)


def _hub_kwargs(pretrained: str, kind: str) -> tuple[dict[str, Any], str | None]:
    """Extra from_pretrained kwargs for a hub id (local_files_only when offline) and the offline reason."""
    if kind != "hub":
        return {}, None
    if hub_offline():
        return {"local_files_only": True}, "HF_HUB_OFFLINE is set and it is not in the local cache"
    reason = hub_unreachable_reason(pretrained)
    if reason:
        return {"local_files_only": True}, reason + " and it is not in the local cache"
    return {}, None


def _not_found(pretrained: str, exc: BaseException, offline_reason: str | None) -> ModelNotFoundError:
    reason = offline_reason or f"{type(exc).__name__}: {exc}"
    reason = " ".join(str(reason).split())
    if len(reason) > 500:
        reason = reason[:500] + "..."
    hint = _download_hint(pretrained)
    extra = f" No local folder '{pretrained}' exists either (working directory: {Path.cwd()})."
    first = pretrained.split("/", 1)[0]
    if first and Path(first).is_dir():
        # e.g. "models/sd15" with models/ present: most likely a local folder that is missing
        hint = _download_hint("stable-diffusion-v1-5/stable-diffusion-v1-5", pretrained)
    return ModelNotFoundError(f"could not load Stable Diffusion '{pretrained}' ({reason}).{extra} {hint}")


def load_components(
    pretrained: str, tiny_dir: Path = DEFAULT_TINY_DIR, dtype: torch.dtype = torch.float32
) -> Components:
    """Load tokenizer, text encoder, VAE, UNet and the DDPM noise scheduler the standard way.

    Hub ids use the standard Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``) and download when the
    network allows; any failure raises ``ModelNotFoundError`` with instructions.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    source = resolve_pretrained(pretrained, tiny_dir)
    kind = _kind(str(pretrained).strip())
    extra, offline_reason = _hub_kwargs(source, kind)
    try:
        with warnings.catch_warnings():
            _quiet_known_warnings()
            tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **extra)
            noise_scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", **extra)
            text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=dtype, **extra)
            vae = AutoencoderKL.from_pretrained(source, subfolder="vae", dtype=dtype, **extra)
            unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", dtype=dtype, **extra)
    except _load_errors() as exc:
        if kind == "hub":
            raise _not_found(source, exc, offline_reason) from exc
        raise ModelNotFoundError(
            f"could not load the Stable Diffusion folder '{source}' ({type(exc).__name__}: {exc}). "
            f"Is it complete (unet/, vae/, text_encoder/, tokenizer/, scheduler/ with weights)?"
            + (" Rebuild it with `python -m workflow_scripts.build_tiny_model --build-tiny "
               f"{source}`." if kind == "tiny" else "")
        ) from exc
    return Components(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        unet=unet,
        noise_scheduler=noise_scheduler,
        source=source,
        kind=kind,
    )


def load_pipeline(pretrained: str, tiny_dir: Path = DEFAULT_TINY_DIR, dtype: torch.dtype = torch.float32):
    """``StableDiffusionPipeline.from_pretrained`` with safety_checker=None and clear errors."""
    from diffusers import StableDiffusionPipeline

    source = resolve_pretrained(pretrained, tiny_dir)
    kind = _kind(str(pretrained).strip())
    extra, offline_reason = _hub_kwargs(source, kind)
    try:
        with warnings.catch_warnings():
            _quiet_known_warnings()
            return StableDiffusionPipeline.from_pretrained(
                source,
                dtype=dtype,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
                **extra,
            )
    except _load_errors() as exc:
        if kind == "hub":
            raise _not_found(source, exc, offline_reason) from exc
        raise ModelNotFoundError(
            f"could not load the Stable Diffusion folder '{source}' ({type(exc).__name__}: {exc})."
        ) from exc


def make_scheduler(name: str, config: dict[str, Any]):
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                           EulerDiscreteScheduler, PNDMScheduler)

    if name == "dpmsolver++":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")
    classes = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "euler_a": EulerAncestralDiscreteScheduler, "pndm": PNDMScheduler}
    return classes[name].from_config(config)
