"""The ``minivllm`` command. One subcommand per job; each lives in a ``_cmd_*`` function.

    minivllm generate "What is the capital of France?"            # the embedded default model
    minivllm generate "Hi" --model ~/models/Qwen3-0.6B --max-tokens 64 --temperature 0.7 --seed 1

    minivllm serve                                                 # OpenAI-compatible API on 127.0.0.1:8000
    minivllm serve --model ~/models/Qwen3-0.6B --port 8080 --max-num-seqs 128
    minivllm serve --model ~/models/Qwen3-8B --tensor-parallel-size 2           # one model over two GPUs

``generate`` applies the model's chat template, streams the answer to stdout as it is produced, and with
``--stats`` reports load time and speed on stderr. ``serve`` loads the model once and answers HTTP requests
(``/v1/completions``, ``/v1/chat/completions``, a chat page at ``/``) until Ctrl-C.
"""

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from minivllm.model.config import UnsupportedModelError
from minivllm.model.weights import WeightLoadError

if TYPE_CHECKING:
    from minivllm.gguf_file import GGUFFile

USER_ERRORS = (FileNotFoundError, UnsupportedModelError, WeightLoadError, ValueError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minivllm", description="A small LLM inference engine for Qwen3.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = commands.add_parser("generate", help="answer one prompt (chat template applied) and print the answer",
                              description="Answer one prompt with the model, streaming the text to stdout.")
    gen.add_argument("prompt", help="the user's message")
    _add_model_arguments(gen)
    gen.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate (default: 256)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 for greedy decoding (default: 0)")
    gen.add_argument("--seed", type=int, default=None, help="random seed for temperature > 0")
    gen.add_argument("--system", default=None, help="a system message (default: the template's own, if any)")
    gen.add_argument("--raw", action="store_true", help="no chat template: continue the prompt text as given")
    gen.add_argument("--stats", action="store_true", help="report load time and tokens/s on stderr")
    gen.set_defaults(run=_cmd_generate)

    srv = commands.add_parser("serve", help="serve the model over HTTP (OpenAI-compatible API, chat page at /)",
                              description="Serve the model: OpenAI's /v1/completions and /v1/chat/completions "
                                          "(streaming too), /v1/models, /health, /metrics, and a chat page at /.")
    _add_model_arguments(srv)
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this "
                                                          "machine only; 0.0.0.0 for every interface)")
    srv.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    srv.add_argument("--served-model-name", default=None, help="the model name clients send (default: the "
                                                                "checkpoint directory's or GGUF file's name)")
    srv.add_argument("--max-num-seqs", type=int, default=64, help="sequences in flight at once (default: 64)")
    srv.add_argument("--max-num-batched-tokens", type=int, default=None,
                     help="tokens per step (default: 2048 on a GPU, 64 on a CPU so decodes keep flowing)")
    srv.add_argument("--max-model-len", type=int, default=None, help="longest prompt + answer (default: the "
                                                                      "model's)")
    srv.add_argument("--gpu-memory-utilization", type=float, default=None,
                     help="this server's share of GPU memory for weights, activations and the KV cache; memory "
                          "other processes hold does not count, and the cache takes at most what is free "
                          "(default: $MINIVLLM_GPU_MEMORY_UTILIZATION, else 0.9)")
    srv.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8", "fp8_e4m3"],
                     help="auto = the model's dtype; fp8 = K and V as e4m3 bytes: half the memory and of decode "
                          "attention's reads, a little less exact (default: auto)")
    srv.add_argument("--max-queued-requests", type=int, default=256,
                     help="sequences waiting beyond --max-num-seqs before the server answers 429 (default: 256)")
    srv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/* (default: "
                                                      "$MINIVLLM_API_KEY, or none)")
    srv.add_argument("--allowed-hosts", default=None, help="comma-separated Host names to answer to, '*' for any "
                                                            "(default: loopback names on a loopback --host, else any)")
    srv.add_argument("--max-request-bytes", type=int, default=8 * 2**20,
                     help="largest request body; larger ones get 413 (default: 8 MiB)")
    srv.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    srv.add_argument("--cuda-graph-max-tokens", type=int, default=8192,
                     help="prefill steps up to this many tokens (and --max-num-batched-tokens) replay piecewise CUDA "
                          "graphs; 0: launched op by op")
    srv.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                     help="plan and prepare each decode step while the one before runs (overlapped loop; default: on "
                          "for one GPU, off on a CPU and with tensor parallelism)")
    srv.add_argument("--reasoning-parser", default="auto", choices=["auto", "qwen3", "none"],
                     help="return <think> text as reasoning_content: auto = when the chat template thinks "
                          "(default: auto)")
    srv.add_argument("--learner", nargs="?", const=True, default=False, metavar="WORKSPACE",
                     help="serve the engine built from your notebook answers (default folder: notebooks/workspace); "
                          "the package's version stands in for what you have not written")
    srv.add_argument("--seed", type=int, default=0, help="seed of the shared sampling generator (default: 0)")
    srv.set_defaults(run=_cmd_serve)
    return parser


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Options every model-running subcommand shares."""
    parser.add_argument("--model", default=None,
                        help="a Hugging Face checkpoint directory or a .gguf file (default: the embedded "
                             "SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16 (default: auto = bfloat16 "
                                                        "on a GPU, float32 on a CPU); float32 given on a CPU is the "
                                                        "exact fp32 path, without the fast fp16-weight linears")
    parser.add_argument("--quantization", default="auto", choices=["auto", "none", "fp16", "int8"],
                        help="CPU linear layers (default: auto = fp16 weights through fbgemm on a CPU unless "
                             "--dtype is given; none = exact fp32; int8 = faster, less exact)")
    parser.add_argument("--tensor-parallel-size", "--tp", type=int, default=1, metavar="N",
                        help="split the model over N ranks: N GPUs (NCCL), or N processes on a CPU (gloo) "
                             "(default: 1)")


def load_tokenizer(source: "Path | GGUFFile"):
    """The tokenizer that comes with a checkpoint directory or a GGUF file (a path or an open ``GGUFFile``)."""
    from minivllm.tokenizer import Tokenizer

    if isinstance(source, Path) and source.is_dir():
        return Tokenizer.from_pretrained(source)
    return Tokenizer.from_gguf(source)


def _cmd_generate(args: argparse.Namespace) -> int:
    from minivllm.config import EngineConfig
    from minivllm.generate import GenerationOutput, stream
    from minivllm.gguf_file import GGUFFile
    from minivllm.model import load_model, resolve_model_path
    from minivllm.model.quant import quantize_model

    if args.tensor_parallel_size != 1:
        return _generate_with_engine(args)
    start = time.perf_counter()
    config = EngineConfig(device=args.device or "auto", dtype=args.dtype, quantization=args.quantization)
    path = resolve_model_path(args.model)
    source = path if path.is_dir() else GGUFFile(path)  # a GGUF file is parsed once, for both
    tokenizer = load_tokenizer(source)
    dtype = {} if args.dtype == "auto" else {"dtype": config.torch_dtype}  # auto: the loader's own default
    model = quantize_model(load_model(source, device=config.torch_device, **dtype),
                           config.quantization_method)  # the engine's rule: fp16 linears on a CPU by default
    load_seconds = time.perf_counter() - start
    prompt_ids = _prompt_ids(tokenizer, args)
    out = GenerationOutput([], "length", len(prompt_ids))
    text = tokenizer.detokenizer()
    for token_id in stream(model, prompt_ids, max_tokens=args.max_tokens, temperature=args.temperature,
                           eos_token_ids=tokenizer.eos_token_ids, seed=args.seed, output=out):
        sys.stdout.write(text.push(token_id))
        sys.stdout.flush()
    sys.stdout.write(text.flush() + "\n")
    if args.stats:
        print(f"[{path.name} on {model.device}, {str(model.dtype).removeprefix('torch.')}, linears: "
              f"{config.quantization_method}] loaded in "
              f"{load_seconds:.1f} s; {out.prompt_tokens} prompt tokens in {out.prefill_seconds:.2f} s; "
              f"{len(out.token_ids)} tokens generated ({out.finish_reason}), "
              f"{out.decode_tokens_per_second:.1f} tokens/s decoding", file=sys.stderr)
    return 0


def _prompt_ids(tokenizer, args: argparse.Namespace) -> list[int]:
    """``generate``'s prompt as token ids: the text as is (``--raw``), else a chat turn (with ``--system``)."""
    if args.raw:
        return tokenizer.encode(args.prompt, add_special_tokens=True)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
               [{"role": "user", "content": args.prompt}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)


def _generate_with_engine(args: argparse.Namespace) -> int:
    """``generate`` through the engine (``LLM``): what tensor parallelism needs (the plain path is one model)."""
    from minivllm.llm import LLM
    from minivllm.sampling_params import SamplingParams

    start = time.perf_counter()
    with LLM(args.model, device=args.device or "auto", dtype=args.dtype, quantization=args.quantization,
             tensor_parallel_size=args.tensor_parallel_size, seed=args.seed or 0) as llm:
        load_seconds = time.perf_counter() - start
        tokenizer = llm.tokenizer
        prompt_ids = _prompt_ids(tokenizer, args)
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
        start = time.perf_counter()
        for piece in llm.stream(prompt_ids, params):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        if args.stats:
            generated = llm.engine.stats["generation_tokens"]
            print(f"[tensor parallel x{args.tensor_parallel_size}, linears: {llm.engine.config.quantization_method}] "
                  f"loaded in {load_seconds:.1f} s; {len(prompt_ids)} prompt tokens; {generated} tokens generated "
                  f"in {time.perf_counter() - start:.2f} s", file=sys.stderr)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from minivllm.server import serve

    # no flag: the engine's default share (0.9, or $MINIVLLM_GPU_MEMORY_UTILIZATION)
    share = {} if args.gpu_memory_utilization is None else {"gpu_memory_utilization": args.gpu_memory_utilization}
    serve(args.model, host=args.host, port=args.port, served_model_name=args.served_model_name,
          max_queued_requests=args.max_queued_requests, device=args.device or "auto", dtype=args.dtype,
          quantization=args.quantization,
          max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
          max_model_len=args.max_model_len, **share,
          kv_cache_dtype=args.kv_cache_dtype,
          enforce_eager=args.enforce_eager, cuda_graph_max_tokens=args.cuda_graph_max_tokens,
          async_scheduling=args.async_scheduling, seed=args.seed,
          tensor_parallel_size=args.tensor_parallel_size, api_key=args.api_key,
          allowed_hosts=args.allowed_hosts.split(",") if args.allowed_hosts else None,
          max_request_bytes=args.max_request_bytes, reasoning_parser=args.reasoning_parser, learner=args.learner)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except USER_ERRORS as e:
        print(f"minivllm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
