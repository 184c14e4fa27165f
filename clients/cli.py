"""`python -m clients`: talk to a µLM server.

  generate "prompt" [--model NAME --max-new-tokens N --temperature T --top-k K --top-p P --seed S --stop STR]
  info | tokenize "text" | bench [--streams N]
  files ... | datasets ... | models ... (clients/resources.py) | jobs ... (clients/jobs.py)
Every command takes --target host:port (default $ULM_TARGET or 127.0.0.1:50051), --token (default $ULM_TOKEN)
for a server that asks for one, --tls-ca FILE for a TLS server, and --timeout. gRPC errors print
"error: CODE: details" and exit 1; a job watched to a state other than SUCCEEDED exits 1 too.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys

import grpc

from clients import jobs, resources
from clients.channel import add_connection_arguments, open_aio_channel, open_channel
from clients.load import run_level
from protos.ulm.v1 import text_generation_pb2 as pb
from protos.ulm.v1 import text_generation_pb2_grpc as pb_grpc

FINISH_NAMES = {v: k.removeprefix("FINISH_REASON_").lower() for k, v in pb.FinishReason.items()}


def connect(args: argparse.Namespace) -> pb_grpc.TextGenerationStub:
    return pb_grpc.TextGenerationStub(open_channel(args))


def generate_request(args: argparse.Namespace) -> pb.GenerateRequest:
    return pb.GenerateRequest(model=args.model, prompt=args.prompt, max_new_tokens=args.max_new_tokens,
                              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                              stop=args.stop)


def run_generate(args: argparse.Namespace) -> None:
    stub = connect(args)
    last = None
    for last in stub.Generate(generate_request(args), timeout=args.timeout):
        sys.stdout.write(last.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.verbose and last is not None:
        print(f"[finish: {FINISH_NAMES[last.finish_reason]}; prompt {last.usage.prompt_tokens} tokens, "
              f"completion {last.usage.completion_tokens} tokens]", file=sys.stderr)


def run_info(args: argparse.Namespace) -> None:
    info = connect(args).GetModelInfo(pb.GetModelInfoRequest(model=args.model), timeout=args.timeout)
    for field in info.DESCRIPTOR.fields:
        print(f"{field.name}: {getattr(info, field.name)}")


def run_tokenize(args: argparse.Namespace) -> None:
    r = connect(args).Tokenize(pb.TokenizeRequest(model=args.model, text=args.text), timeout=args.timeout)
    print(json.dumps({"token_ids": list(r.token_ids), "tokens": list(r.tokens)}, ensure_ascii=False))


async def bench(args: argparse.Namespace, streams: int, max_new_tokens: int, prompt: str = "Once upon a time",
                repeats: int = 3) -> dict:
    """N concurrent greedy streams against one alone (bench.serving's levels): if requests are batched,
    the ratio wall(N) / (N * wall(1)) is far below 1."""

    async with open_aio_channel(args) as channel:
        stub = pb_grpc.TextGenerationStub(channel)
        await run_level(stub, 1, max_new_tokens, prompt, 1)  # warm the connection
        one = await run_level(stub, 1, max_new_tokens, prompt, repeats)
        many = await run_level(stub, streams, max_new_tokens, prompt, streams)
    return dict(streams=streams, tokens=max_new_tokens, wall_one_s=one["wall_s"], wall_many_s=many["wall_s"],
                ratio=many["wall_s"] / (streams * one["wall_s"]), ttft_one_ms=one["ttft_ms"]["p50"],
                itl_one_ms=one["itl_ms"]["p50"], itl_many_ms=many["itl_ms"]["p50"],
                tokens_per_s=many["aggregate_tokens_per_s"], errors=many["errors"])


def run_bench(args: argparse.Namespace) -> None:
    r = asyncio.run(bench(args, args.streams, args.max_new_tokens))
    print(f"1 stream: {r['wall_one_s'] * 1e3:.1f} ms for {r['tokens']} tokens (TTFT {r['ttft_one_ms']:.2f} ms, "
          f"{r['itl_one_ms']:.2f} ms/token)")
    print(f"{r['streams']} streams: {r['wall_many_s'] * 1e3:.1f} ms in all ({r['itl_many_ms']:.2f} ms/token per "
          f"stream, {r['tokens_per_s']:.0f} tokens/s)")
    print(f"batching ratio wall({r['streams']}) / ({r['streams']} x wall(1)) = {r['ratio']:.3f}")
    if r["errors"]:
        print(f"errors: {r['errors']}")
    print("(the full concurrency sweep, with plots: python -m bench.serving --target ...)")


def build_parser() -> argparse.ArgumentParser:
    conn = argparse.ArgumentParser(add_help=False)
    add_connection_arguments(conn)
    common = argparse.ArgumentParser(add_help=False, parents=[conn])
    common.add_argument("--model", default="", help="model name (default: the server's)")

    parser = argparse.ArgumentParser(prog="python -m clients", description="µLM gRPC client")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", parents=[common], help="stream a completion to stdout")
    g.add_argument("prompt")
    g.add_argument("--max-new-tokens", type=int, default=0, help="0 = the server's default")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
    g.add_argument("-v", "--verbose", action="store_true", help="print the finish reason and usage to stderr")
    g.set_defaults(func=run_generate)
    sub.add_parser("info", parents=[common], help="print the served model's details").set_defaults(func=run_info)
    t = sub.add_parser("tokenize", parents=[common], help="print token ids as JSON")
    t.add_argument("text")
    t.set_defaults(func=run_tokenize)
    b = sub.add_parser("bench", parents=[common], help="measure batching: N concurrent streams vs one")
    b.add_argument("--streams", type=int, default=32)
    b.add_argument("--max-new-tokens", type=int, default=64)
    b.set_defaults(func=run_bench)
    resources.add_commands(sub, conn)
    jobs.add_commands(sub, conn)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except grpc.RpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as e:  # protobuf range errors (a negative --max-new-tokens), a file to upload
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
