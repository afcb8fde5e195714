"""The `run.py` command line. Kept thin: each subcommand parses its flags and calls the library."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from tqdm import tqdm

from jaxtl.create import DEFAULT_WEIGHTS, create_model, get_preprocessing
from jaxtl.data.imagenet import imagenet_classes
from jaxtl.data.preprocess import ImageReadError
from jaxtl.inference import expand_image_paths, predict_top_k
from jaxtl.models.registry import MODELS, get_model_spec
from jaxtl.weights.convert import WeightsMismatchError
from jaxtl.weights.files import WeightsUnavailableError
from jaxtl.weights.torch_file import WeightsFileError

# Errors that are the user's to fix: reported in one line, no traceback.
_USER_ERRORS = (ValueError, FileNotFoundError, WeightsFileError, WeightsMismatchError, WeightsUnavailableError,
                ImageReadError)


def _add_predict(subparsers) -> None:
    p = subparsers.add_parser("predict", help="top-k ImageNet classes of images (files or folders)")
    p.add_argument("--model", required=True, help=f"one of: {', '.join(MODELS)}")
    p.add_argument("--weights", default=DEFAULT_WEIGHTS,
                   help="registered weights id, 'default' (the model's default weights) or a .pth/.safetensors file")
    p.add_argument("--top", type=int, default=5, help="how many classes to show per image (default 5)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", action="store_true", help="print one JSON object per image")
    p.add_argument("images", nargs="+", help="image files or folders of images")
    p.set_defaults(func=predict)


def predict(args: argparse.Namespace) -> None:
    get_model_spec(args.model)  # a misspelled model name fails before any file is read
    files = expand_image_paths(args.images)
    if not files:
        raise FileNotFoundError(f"no image files found in {args.images}")
    model, variables = create_model(args.model, args.weights)
    prep = get_preprocessing(args.model, args.weights)
    classes = imagenet_classes() if model.num_classes == len(imagenet_classes()) else None
    top = min(args.top, model.num_classes)
    results = predict_top_k(model, variables, prep, files, top_k=top, batch_size=args.batch_size)
    for path, indices, probs in tqdm(results, total=len(files), desc="predict", unit="img", file=sys.stderr,
                                     disable=len(files) < 2 * args.batch_size):
        top_list = [
            {"index": int(i), "wnid": classes[i][0] if classes else None,
             "label": classes[i][1] if classes else str(int(i)), "prob": round(float(p), 6)}
            for i, p in zip(indices, probs)
        ]
        if args.json:
            print(json.dumps({"path": str(path), "top": top_list}), flush=True)
        else:
            print(path)
            for rank, entry in enumerate(top_list, 1):
                print(f"  {rank}. {entry['prob']:6.3f}  {entry['wnid'] or '':9}  {entry['label']}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="run.py", description="jaxtl: transfer learning with JAX/Flax backbones")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_predict(subparsers)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except _USER_ERRORS as e:
        parser.exit(2, f"run.py {args.command}: error: {e}\n")
