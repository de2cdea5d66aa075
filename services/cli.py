"""`caraserve`: the command-line entry point, a small dispatcher over subcommands.

Each subcommand names its handler as "module:function" and the module is imported only when the subcommand
runs, so `caraserve --help` stays fast. A handler takes the parsed arguments and returns an exit code; it raises
CLIError for a problem the user can fix, which prints as one line on stderr.
"""
from __future__ import annotations

import argparse
import importlib
import sys


class CLIError(Exception):
    """A user-facing error: printed as one line, then the process exits with `exit_code`."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """The engine's options (services/gpu_worker/engine/config.py); unset ones keep EngineConfig's defaults."""
    group = parser.add_argument_group("engine")
    group.add_argument("--model", metavar="PATH",
                       help="base model: a local Hugging Face directory or .gguf file "
                            "(default: the embedded SmolLM2-135M-Instruct)")
    group.add_argument("--served-model-name", metavar="NAME",
                       help="the base model's name in requests' `model` field (default: derived from the model) "
                            "[CARASERVE_SERVED_MODEL_NAME in mesh commands]")
    group.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"),
                       help="weight and activation dtype (default: auto = float32 on CPU, bfloat16 on CUDA)")
    group.add_argument("--device", metavar="DEVICE", help="auto, cpu, cuda or cuda:N (default: auto)")
    group.add_argument("--max-lora-rank", type=int, metavar="N", help="refuse adapters of higher rank (default: 256)")
    group.add_argument("--max-loras", type=int, metavar="N", help="adapters resident at once (default: 8)")
    group.add_argument("--max-num-seqs", type=int, metavar="N", help="sequences running at once (default: 64)")
    group.add_argument("--threads", type=int, metavar="N",
                       help="torch CPU threads of the engine (default: torch's choice, the usable cores)")
    group.add_argument("--max-num-batched-tokens", type=int, metavar="N",
                       help="tokens per engine step, prefill chunks and decodes together (default: 512)")
    group.add_argument("--lora-backend", choices=("auto", "torch", "triton"),
                       help="multi-LoRA kernels: Triton (unpadded mixed ranks) or the torch reference "
                            "(default: auto = triton on CUDA, torch on CPU)")
    group.add_argument("--attention-backend", choices=("auto", "torch", "triton"),
                       help="attention over the paged KV cache: Triton kernels or the torch SDPA path "
                            "(default: auto = triton on CUDA, torch on CPU)")
    group.add_argument("--cuda-graphs", choices=("auto", "off"),
                       help="replay decode-only steps as CUDA graphs, one launch instead of hundreds a step "
                            "(default: auto = on CUDA with the triton backends)")
    group.add_argument("--cpu-assist", choices=("off", "auto", "always"),
                       help="CPU-assisted prefill: 'auto' (on a GPU) starts a cold adapter's prefill at once while its "
                            "layers load to the GPU by groups, the LoRA deltas of layers not yet loaded computed by "
                            "cpu_prefill worker processes (no GPU: as off); 'always' computes every prefill LoRA "
                            "delta on those workers (tests, CPU benchmarks); besides its own, `caraserve serve "
                            "cpu_prefill` processes with the same --data-dir join it while it serves (default: auto)")
    group.add_argument("--cpu-workers", type=int, metavar="N",
                       help="cpu_prefill worker processes the engine starts itself with --cpu-assist auto or always; "
                            "0: only joined ones (the device path while none is there) (default: 2)")
    group.add_argument("--data-dir", metavar="DIR",
                       help="cache for converted models, and the mesh's JetStream store "
                            "(default: $CARASERVE_DATA_DIR or ~/.cache/caraserve)")


def mesh_config(args: argparse.Namespace):
    """The mesh settings of a `serve`/`up` command (flags > CARASERVE_* environment > defaults); CLIError if bad."""
    from shared.mesh_config import MeshConfigError, mesh_config_from_args

    try:
        return mesh_config_from_args(args)
    except MeshConfigError as exc:
        raise CLIError(str(exc)) from None


def run_mesh_service(build, config, name: str) -> int:
    """Run one service process until SIGTERM/SIGINT (shared/service_runtime.py); a port in use or an unreachable
    NATS server (OSError, ConnectionError) becomes a one-line CLIError instead of a traceback."""
    from shared.service_runtime import run_service

    try:
        return run_service(build, config, name)
    except OSError as exc:
        raise CLIError(exc.strerror or str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="caraserve",
        description="CaraServe mesh: serve many LoRA adapters on one base LLM.",
        formatter_class=lambda prog: argparse.HelpFormatter(prog, max_help_position=30),
    )
    commands = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")

    run_batch = commands.add_parser(
        "run-batch",
        help="run an OpenAI batch file (JSONL) offline",
        description="Run the requests of an OpenAI batch input file (one JSON object a line: custom_id, "
                    "method POST, url /v1/chat/completions or /v1/completions, body) through the engine, all "
                    "at once with continuous batching, and write OpenAI batch output records in input order. "
                    "A bad line gets an error record; the others still run.",
    )
    run_batch.add_argument("-i", "--input", required=True, metavar="FILE", help="batch input JSONL ('-': stdin)")
    run_batch.add_argument("-o", "--output", required=True, metavar="FILE", help="results JSONL ('-': stdout)")
    run_batch.add_argument("--lora-modules", nargs="+", action="extend", metavar="NAME=PATH",
                           help="PEFT LoRA adapters to serve, requested by NAME in the `model` field "
                                "(one or more; the option may repeat)")
    add_engine_args(run_batch)
    run_batch.set_defaults(handler="services.gpu_worker.run_batch:run_batch_command")

    demo = commands.add_parser(
        "demo",
        help="show the demo adapters' behaviours, offline",
        description="Ask a few questions of the base model and of every shipped demo adapter, in one batch "
                    "(the run-batch code path), and print question, model and answer as a table.",
    )
    demo.add_argument("--output", metavar="FILE", help="also keep the batch results as JSONL")
    demo.add_argument("--question", action="append", metavar="TEXT",
                      help="ask this instead of the built-in questions (may repeat)")
    demo.add_argument("--max-tokens", type=int, default=64, metavar="N", help="tokens per answer (default: 64)")
    add_engine_args(demo)
    demo.set_defaults(handler="services.gpu_worker.run_batch:demo_command")

    _add_profile(commands)
    _add_simulate(commands)
    _add_up(commands)
    _add_serve(commands)
    return parser


def _add_profile(commands) -> None:
    profile = commands.add_parser(
        "profile",
        help="measure this machine's decode and prefill times and fit the scheduler's performance model",
        description="Run the engine on random adapters of several ranks: decode step time over batch sizes and rank "
                    "mixes, prefill time over prompt lengths. Fit the rank-aware scheduler's cost model (both "
                    "forms: batch x max rank and sum of ranks; the better fit is kept, both R² are reported) and "
                    "write it as JSON. A gpu_worker loads it with --perf-model; without one it profiles itself "
                    "briefly at start-up.",
    )
    profile.add_argument("-o", "--output", metavar="FILE",
                         help="where to write the model (default: <data dir>/perf_models/<model>-<device>.json)")
    profile.add_argument("--batch-sizes", metavar="N,N,...", help="decode batch sizes to measure (default: 1,2,4,8,16)")
    profile.add_argument("--ranks", metavar="R,R,...", help="LoRA ranks of the random adapters (default: 8,16,32,64)")
    profile.add_argument("--prompt-lengths", metavar="N,N,...",
                         help="prompt lengths for prefill (default: 16,64,128,256)")
    profile.add_argument("--repeats", type=int, metavar="N", help="timed steps per point (default: 5)")
    profile.add_argument("--quick", action="store_true",
                         help="fewer points and repeats (what a worker does at start-up without a model file)")
    add_engine_args(profile)
    profile.set_defaults(handler="services.gpu_worker.profiler:profile_command")


def _add_simulate(commands) -> None:
    simulate = commands.add_parser(
        "simulate",
        help="simulate a cluster of workers under each placement policy (discrete events, no model needed)",
        description="A discrete-event simulation of many workers with continuous batching whose step costs come "
                    "from a performance model file, driven by Poisson arrivals over power-law adapter popularity. "
                    "Compares placement policies on time per output token and SLO attainment; writes JSON and "
                    "PNG plots. Deterministic for a seed.",
    )
    simulate.set_defaults(handler="services.scheduler.simulate_command:simulate_command")
    from services.scheduler.simulate_command import add_simulate_args

    add_simulate_args(simulate)


_SERVICES = {
    # service: (help, handler, mesh settings it reads, takes engine options)
    "gateway": ("the OpenAI-compatible HTTP API (aiohttp)", "services.gateway.service:serve_command",
                ["host", "port", "api_key", "admin_key", "max_pending", "max_upload_mb", "request_timeout",
                 "worker_timeout"], False),
    "scheduler": ("places requests on GPU workers (replicas share the work)", "services.scheduler.service:serve_command",
                  ["worker_timeout", "request_timeout", "placement_policy"], False),
    "gpu_worker": ("the engine: one per GPU, or one on the CPU", "services.gpu_worker.service:serve_command",
                   ["worker_id", "heartbeat_interval", "request_timeout", "perf_model", "slo_tpot_ms", "slo_ttft_ms",
                    "max_cpu_loras"], True),
    "adapter_store": ("adapter registry and blobs in NATS JetStream", "services.adapter_store.service:serve_command",
                      ["request_timeout"], True),
}
# node-local services that do not use NATS: name -> (help, handler, module:function that adds their arguments)
_NODE_SERVICES = {
    "cpu_prefill": ("LoRA-delta worker processes that join this node's gpu_workers (CPU-assisted prefill)",
                    "services.cpu_prefill.service:serve_command", "services.cpu_prefill.service:add_serve_args"),
}
_COMMON_MESH = ["nats_url", "trace_exporter", "log_level"]


def _add_up(commands) -> None:
    from shared.mesh_config import add_mesh_args

    up = commands.add_parser(
        "up",
        help="start the whole mesh on this machine (embedded NATS, all services)",
        description="Start an embedded NATS server with JetStream (loopback only, credentials generated for this "
                    "start), then adapter_store, scheduler, one gpu_worker (GPU if there is one, else CPU) and the "
                    "gateway. Prints the URL and the API key, registers the demo adapters on first start, and "
                    "stops everything cleanly on Ctrl-C or SIGTERM.",
    )
    add_mesh_args(up, ["host", "port", "nats_port", "api_key", "admin_key", "max_pending", "max_upload_mb", "heartbeat_interval", "worker_timeout", "trace_exporter",
                       "log_level", "placement_policy", "perf_model", "slo_tpot_ms", "slo_ttft_ms", "max_cpu_loras"])
    up.add_argument("--workers", type=int, default=1, metavar="N", help="gpu_worker processes to start (default: 1)")
    up.add_argument("--no-demo-adapters", action="store_true", help="do not register the shipped demo adapters")
    up.add_argument("--ready-timeout", type=float, metavar="S",
                    help="give up if the mesh does not serve within S seconds; a first start loads the model and "
                         "profiles the worker once (default: 600)")
    add_engine_args(up)
    up.set_defaults(handler="services.up:up_command")


def _add_serve(commands) -> None:
    from shared.mesh_config import add_mesh_args

    serve = commands.add_parser(
        "serve",
        help="run one service against an existing NATS server",
        description="Run one mesh service as this process, connected to the NATS server at --nats-url "
                    "(what compose.yaml and multi-node deployments use). Several gpu_workers may join one mesh.",
    )
    services = serve.add_subparsers(dest="service", title="services", metavar="SERVICE", required=True)
    for name, (help_text, handler, settings, engine) in _SERVICES.items():
        sub = services.add_parser(name, help=help_text, description=f"Run the {name} service: {help_text}.")
        add_mesh_args(sub, _COMMON_MESH + settings)
        if engine:
            add_engine_args(sub)
        sub.set_defaults(handler=handler)
    for name, (help_text, handler, add_args) in _NODE_SERVICES.items():
        sub = services.add_parser(name, help=help_text, description=f"Run the {name} service: {help_text}.")
        module, _, function = add_args.partition(":")
        getattr(importlib.import_module(module), function)(sub)
        sub.set_defaults(handler=handler)


def main(argv: list[str] | None = None) -> int:
    """Parse `argv`, run the subcommand, return its exit code (2: bad usage, 1: failure)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed usage and the error (or the help)
        return exc.code if isinstance(exc.code, int) else 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    module, _, function = args.handler.partition(":")
    try:
        return getattr(importlib.import_module(module), function)(args)
    except CLIError as exc:
        command = " ".join(filter(None, (args.command, getattr(args, "service", None))))
        print(f"caraserve {command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"caraserve {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    from services.cli import main as _main  # the module proper, so CLIError is one class for all handlers

    sys.exit(_main())
