"""The offline "tiny" Stable Diffusion 1.5 look-alike: a CLIP byte-level BPE tokenizer built from
scratch for the prompts' words, and small random-weight SD 1.5 components saved in the diffusers
folder layout (``build_tiny_pipeline``). Loaded like any base model by ``base_model.load_components``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch

from workflow_scripts.models.base_model import sd15_noise_scheduler

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


def _tiny_unet(sample_size: int, blocks: tuple[int, ...] = TINY_UNET_BLOCK_OUT, heads: int = TINY_UNET_HEADS):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=blocks,
        down_block_types=("CrossAttnDownBlock2D",) * len(blocks),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("CrossAttnUpBlock2D",) * len(blocks),
        cross_attention_dim=TINY_CROSS_ATTENTION_DIM,
        attention_head_dim=heads,
        norm_num_groups=32,
        norm_eps=1e-5,
        act_fn="silu",
        flip_sin_to_cos=True,
        freq_shift=0,
        downsample_padding=1,
        center_input_sample=False,
        use_linear_projection=False,
    )


def _tiny_vae(resolution: int, blocks: tuple[int, ...] = TINY_VAE_BLOCK_OUT):
    from diffusers import AutoencoderKL

    n = len(blocks)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=blocks,
        layers_per_block=1,
        act_fn="silu",
        latent_channels=4,
        norm_num_groups=min(32, *blocks),
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


def tiny_parts(prompts_words: Iterable[str] = (), resolution: int = 64, seed: int = 0,
               unet_blocks: tuple[int, ...] = TINY_UNET_BLOCK_OUT, unet_heads: int = TINY_UNET_HEADS,
               vae_blocks: tuple[int, ...] = TINY_VAE_BLOCK_OUT) -> dict:
    """The tiny model's random-weight parts (``seed``) and its tokenizer files, written to a temporary
    folder: {"tokenizer_dir", "tokenizer", "vocab", "unet", "vae", "text_encoder"}. The caller removes
    ``tokenizer_dir`` (``save_pipeline`` does). ``prompts_words``: extra words or whole prompts whose
    words should be single tokens."""
    from transformers import CLIPTokenizer

    vae_scale_factor = 2 ** (len(TINY_VAE_BLOCK_OUT) - 1)
    multiple = vae_scale_factor * 2 ** (len(unet_blocks) - 1)
    if resolution <= 0 or resolution % multiple:
        raise ValueError(f"resolution must be a positive multiple of {multiple}, got {resolution}")
    texts = default_prompt_texts() + [str(w) for w in prompts_words]
    tok_src = Path(tempfile.mkdtemp(prefix="tiny-tokenizer-"))
    vocab = write_clip_tokenizer_files(tok_src, texts)
    tokenizer = CLIPTokenizer.from_pretrained(tok_src)
    _check_tokenizer(tokenizer, texts)
    torch.manual_seed(seed)
    unet = _tiny_unet(resolution // vae_scale_factor, unet_blocks, unet_heads)
    torch.manual_seed(seed + 1)
    vae = _tiny_vae(resolution, vae_blocks)
    torch.manual_seed(seed + 2)
    text_encoder = _tiny_text_encoder(vocab)
    return {"tokenizer_dir": tok_src, "tokenizer": tokenizer, "vocab": vocab, "unet": unet, "vae": vae,
            "text_encoder": text_encoder}


def save_pipeline(out_dir: Path, parts: dict, info: dict) -> Path:
    """Save ``parts`` (from ``tiny_parts``, weights trained or not) as a diffusers Stable Diffusion folder
    with SD 1.5's noise schedule, ``info`` as ``tiny_model_info.json``. Atomic: built in a temporary
    sibling folder, then renamed over ``out_dir``."""
    from diffusers import StableDiffusionPipeline

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        pipe = StableDiffusionPipeline(
            vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"], unet=parts["unet"],
            scheduler=sd15_noise_scheduler(), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
        model_dir = tmp / "model"
        pipe.save_pretrained(model_dir, safe_serialization=True)
        # Tokenizer folder in SD 1.5's own layout (vocab.json + merges.txt, no tokenizer.json).
        shutil.rmtree(model_dir / "tokenizer")
        shutil.copytree(parts["tokenizer_dir"], model_dir / "tokenizer")
        (model_dir / "tiny_model_info.json").write_text(json.dumps(info, indent=2))
        _normalize_permissions(model_dir)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "x")
            os.replace(model_dir, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(model_dir, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(parts["tokenizer_dir"], ignore_errors=True)
    return out_dir


def model_info(parts: dict, description: str, seed: int, resolution: int) -> dict:
    return {
        "description": description,
        "seed": seed,
        "resolution": resolution,
        "vae_scale_factor": 2 ** (len(TINY_VAE_BLOCK_OUT) - 1),
        "params": {name: _n_params(parts[name]) for name in ("unet", "vae", "text_encoder")},
        "vocab_size": len(parts["vocab"]),
    }


def build_tiny_pipeline(
    out_dir: Path,
    prompts_words: Iterable[str] = (),
    resolution: int = 64,
    seed: int = 0,
) -> Path:
    """Build the tiny SD 1.5 look-alike (random weights from ``seed``) and save it to ``out_dir``
    (atomically). Returns ``out_dir``."""
    parts = tiny_parts(prompts_words, resolution, seed)
    info = model_info(parts, "tiny random-weight Stable Diffusion 1.5 look-alike (offline demo)", seed, resolution)
    return save_pipeline(out_dir, parts, info)
