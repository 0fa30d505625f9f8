"""Build the tiny offline Stable Diffusion model, or check that a base model loads (tiny_model, base_model).

    python -m workflow_scripts.models.build_tiny_model --build-tiny results/models/tiny-sd [--resolution 64] [--seed 0]
    python -m workflow_scripts.models.build_tiny_model --check PRETRAINED [--tiny-dir results/models/tiny-sd]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from workflow_scripts.common.errors import run_stage
from workflow_scripts.models.base_model import DEFAULT_TINY_DIR, load_components
from workflow_scripts.models.tiny_model import _folder_size, _n_params, build_tiny_pipeline


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


@run_stage
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workflow_scripts.models.build_tiny_model", description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--build-tiny", metavar="DIR", help="build the tiny offline SD model into DIR")
    group.add_argument("--check", metavar="PRETRAINED", help="try to load 'tiny', a folder or a hub id")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--words", nargs="*", default=[], help="extra prompt words/prompts for the tokenizer")
    parser.add_argument("--tiny-dir", default=str(DEFAULT_TINY_DIR), help="where 'tiny' lives (for --check)")
    args = parser.parse_args(argv)

    if args.build_tiny:
        out = build_tiny_pipeline(Path(args.build_tiny), args.words, resolution=args.resolution, seed=args.seed)
        info = json.loads((out / "tiny_model_info.json").read_text())
        p = info["params"]
        print(f"built tiny Stable Diffusion at {out} (seed {args.seed}, {args.resolution} px)")
        print(
            f"  unet {_fmt_params(p['unet'])} params, vae {_fmt_params(p['vae'])}, "
            f"text encoder {_fmt_params(p['text_encoder'])}, vocab {info['vocab_size']} tokens"
        )
        print(f"  saved size {_folder_size(out) / 2**20:.2f} MiB")
        return 0

    comps = load_components(args.check, Path(args.tiny_dir))
    print(f"loaded {comps.kind} Stable Diffusion from {comps.source}")
    for name in ("unet", "vae", "text_encoder"):
        mod = getattr(comps, name)
        print(f"  {name}: {type(mod).__name__}, {_fmt_params(_n_params(mod))} params, {next(mod.parameters()).dtype}")
    print(f"  tokenizer: {type(comps.tokenizer).__name__}, {len(comps.tokenizer)} tokens")
    print(f"  noise scheduler: {type(comps.noise_scheduler).__name__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
