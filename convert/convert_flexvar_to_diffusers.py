"""Convert the original FlexVAR checkpoints (FlexVAE.pth + FlexVARd*.pth) into a diffusers FlexVARPipeline folder.

    python convert/convert_flexvar_to_diffusers.py --transformer_ckpt FlexVARd24-epo349.pth \
        --vq_ckpt FlexVAE.pth --output_dir flexvar-d24 [--dtype bfloat16] [--push_to_hub user/flexvar-d24]
"""

from __future__ import annotations

import argparse
import sys

import torch

from flexvar_hf.conversion import CheckpointError, convert_original_to_diffusers

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transformer_ckpt", required=True, help="Original FlexVARd*.pth (raw, model or trainer).")
    parser.add_argument("--vq_ckpt", required=True, help="Original FlexVAE.pth.")
    parser.add_argument("--output_dir", required=True, help="Folder to write; must not exist unless --overwrite.")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="Dtype of the saved weights.")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace an existing output folder, if it is a pipeline folder written by flexvar-hf holding nothing "
        "else (never a folder with other files, a regular file or the working directory).",
    )
    parser.add_argument("--push_to_hub", metavar="REPO_ID", default=None, help="Also upload the folder to the Hub.")
    parser.add_argument(
        "--allow_unsafe_pickle",
        action="store_true",
        help="Load checkpoints with full unpickling (runs code stored in the file). Only for files you trust.",
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        pipeline = convert_original_to_diffusers(
            args.transformer_ckpt,
            args.vq_ckpt,
            args.output_dir,
            dtype=DTYPES[args.dtype],
            allow_unsafe_pickle=args.allow_unsafe_pickle,
            overwrite=args.overwrite,
            model_id=args.push_to_hub,
        )
    except (CheckpointError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    config = pipeline.transformer.config
    print(
        f"Wrote {args.output_dir}: depth {config.num_layers}, width {config.hidden_size}, "
        f"{config.num_classes} classes, vocabulary {config.vocab_size}, {args.dtype}."
    )
    if args.push_to_hub:
        # The folder as written, model card included (`pipeline.push_to_hub` would replace the card with a blank one).
        from huggingface_hub import create_repo, upload_folder

        repo_id = create_repo(args.push_to_hub, exist_ok=True).repo_id
        upload_folder(repo_id=repo_id, folder_path=args.output_dir, commit_message="Convert FlexVAR checkpoints")
        print(f"Pushed to {repo_id}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
