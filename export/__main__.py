"""python -m export --checkpoint DIR --out DIR [--quantize int8] [--opset N] [--eval-data PATH]"""
from __future__ import annotations

import argparse
import sys

from export.onnx_export import DEFAULT_OPSET
from export.pipeline import QUANTIZE, ExportOptions, VerificationError, export_checkpoint
from export.verify import ATOL


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export", description="Export a µLM checkpoint to ONNX, verify it "
                                "against PyTorch and optionally quantize it to int8.")
    p.add_argument("--checkpoint", required=True, help="µLM checkpoint directory")
    p.add_argument("--out", required=True, help="export directory to write (model.onnx, tokenizer, manifest)")
    p.add_argument("--quantize", choices=QUANTIZE, help="dynamic int8 quantization of the MatMul weights (CPU)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--per-channel", action="store_true", help="int8: one scale per output column")
    p.add_argument("--eval-data", help="held-out text for perplexity: a dataset directory (val split) or a text "
                   "file (its last 10%%); default: the dataset the checkpoint was trained on, if it is here")
    p.add_argument("--eval-tokens", type=int, default=32768, help="at most this many evaluation tokens")
    p.add_argument("--atol", type=float, default=ATOL, help="max abs logits difference accepted (fp32)")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: physical cores)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    opts = ExportOptions(checkpoint=args.checkpoint, out=args.out, quantize=args.quantize, opset=args.opset,
                         per_channel=args.per_channel, eval_data=args.eval_data, eval_tokens=args.eval_tokens,
                         atol=args.atol, threads=args.threads)
    try:
        export_checkpoint(opts)
    except (ValueError, OSError) as e:  # CheckpointError is a ValueError
        print(f"export: error: {e}", file=sys.stderr)
        return 2
    except VerificationError as e:
        print(f"export: verification failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
