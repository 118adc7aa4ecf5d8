"""Write a diffusers FlexVARPipeline folder back as original FlexVAR checkpoints, loadable by the original code.

    python convert/convert_diffusers_to_flexvar.py --pipeline_dir flexvar-d24 \
        --transformer_out FlexVARd24.pth --vq_out FlexVAE.pth
"""

from __future__ import annotations

import argparse
import sys

from flexvar_hf.conversion import DEFAULT_TRAIN_PATCH_NUMS, CheckpointError, convert_diffusers_to_original


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline_dir", required=True, help="A FlexVARPipeline folder (or Hub id).")
    parser.add_argument("--transformer_out", required=True, help="Where to write the FlexVARd*.pth state dict.")
    parser.add_argument("--vq_out", required=True, help="Where to write FlexVAE.pth ({'model': state_dict}).")
    parser.add_argument(
        "--overwrite", action="store_true", help="Replace existing output files (regular files only)."
    )
    parser.add_argument(
        "--train_patch_nums",
        default="_".join(map(str, DEFAULT_TRAIN_PATCH_NUMS)),
        help="Scales for the original's `attn_bias_for_masking` buffer, e.g. 1_2_3_4 (the original's default).",
    )
    return parser.parse_args(argv)


def parse_patch_nums(text: str) -> tuple[int, ...]:
    """"1_2_3_4" (or "1-2-3-4") -> (1, 2, 3, 4); ValueError naming --train_patch_nums otherwise."""
    try:
        sides = tuple(int(side) for side in text.replace("-", "_").split("_"))
    except ValueError:
        sides = ()
    if not sides or any(side < 1 for side in sides):
        raise ValueError(f"--train_patch_nums must be positive sides joined by '_', e.g. 1_2_3_4; got {text!r}.")
    return sides


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        patch_nums = parse_patch_nums(args.train_patch_nums)
        convert_diffusers_to_original(
            args.pipeline_dir, args.transformer_out, args.vq_out, patch_nums, overwrite=args.overwrite
        )
    except (CheckpointError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"Wrote {args.transformer_out} and {args.vq_out}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
