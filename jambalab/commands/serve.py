"""`jambalab serve`: an OpenAI-compatible HTTP server (jambalab.serve.http) on the serving engine.

Loads the model once, starts the engine, binds the address (127.0.0.1 unless --host says
otherwise), prints it, and serves until SIGINT or SIGTERM. Then it stops accepting connections,
lets running requests and streams finish (up to --drain-timeout seconds, after which they are
cancelled), stops the engine and exits 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from pathlib import Path

from jambalab.commands.common import add_model_source, add_precision_args, load_model, run_with_threads
from jambalab.errors import InputError


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over the OpenAI HTTP API (completions, chat, streaming)")
    add_model_source(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--served-model-name", help="the model name clients send (default: the directory or preset name)")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together (engine slots, default 8)")
    p.add_argument("--max-seq-len", type=int, default=4096,
                   help="context budget of one request, prompt + max_tokens (default 4096)")
    p.add_argument("--kv-budget", type=int, default=None,
                   help="attention KV-cache tokens over all slots (default max-batch x max-seq-len)")
    p.add_argument("--prefix-cache", default="256MiB",
                   help="memory for the prefix-state cache, e.g. 512MiB or 1GB; 0 disables it (default 256MiB)")
    p.add_argument("--chunk-size", type=int, default=256, help="prefill tokens per engine step (default 256)")
    p.add_argument("--max-waiting", type=int, default=256,
                   help="queued requests beyond which the server answers 503 (default 256)")
    add_precision_args(p)
    p.add_argument("--api-key", default=os.environ.get("JAMBALAB_API_KEY"),
                   help="require Authorization: Bearer KEY on every route but /health "
                        "(default: $JAMBALAB_API_KEY; none = no authentication)")
    p.add_argument("--chat-template", help="a jinja2 chat template file (default: the checkpoint's)")
    p.add_argument("--max-body", default="4MiB", help="largest request body accepted (default 4MiB)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds running requests get to finish after SIGINT/SIGTERM (default 30)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                   help="uvicorn's log level (default warning); info also logs every request")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    return run_with_threads(args.threads, lambda: serve(args))


def _check_args(args: argparse.Namespace) -> None:
    for name in ("max_batch", "max_seq_len", "chunk_size", "max_waiting"):
        if getattr(args, name) <= 0:
            raise InputError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.kv_budget is not None and args.kv_budget <= 0:
        raise InputError(f"--kv-budget must be positive, got {args.kv_budget}")
    if not 0 <= args.port <= 65535:
        raise InputError(f"--port must lie in 0..65535, got {args.port}")
    if args.drain_timeout < 0:
        raise InputError(f"--drain-timeout must be >= 0, got {args.drain_timeout}")
    if args.chat_template is not None and not Path(args.chat_template).is_file():
        raise InputError(f"--chat-template file {args.chat_template} does not exist")


def _size(text: str, flag: str, allow_zero: bool = False) -> int:
    from jambalab.memory import parse_size

    if allow_zero and text.strip() == "0":
        return 0
    try:
        return parse_size(text)
    except InputError as e:
        raise InputError(f"{flag}: {e}") from None


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from jambalab.serve.engine import Engine, EngineConfig
    from jambalab.serve.http import ServerConfig, create_app
    from jambalab.hf import resolve_model_dir
    from jambalab.tokenizer import load_tokenizer

    prefix_bytes, max_body = _size(args.prefix_cache, "--prefix-cache", True), _size(args.max_body, "--max-body")
    sock = bind(args.host, args.port)  # before loading: a port in use fails fast
    model = load_model(args)
    tok = load_tokenizer(resolve_model_dir(args.model) if args.model else None, model.config)
    ecfg = EngineConfig(max_batch=args.max_batch, kv_budget_tokens=args.kv_budget, max_seq_len=args.max_seq_len,
                        chunk_size=args.chunk_size, prefix_cache_bytes=prefix_bytes, max_waiting=args.max_waiting)
    name = args.served_model_name or served_name(args)
    max_len = min(args.max_seq_len, args.kv_budget or args.max_seq_len)
    scfg = ServerConfig(model_name=name, max_model_len=max_len, vocab_size=model.config.vocab_size,
                        api_key=args.api_key or None, max_body_bytes=max_body, chat_template_file=args.chat_template)
    engine = Engine(model, ecfg).start()
    try:
        app = create_app(engine, tok, scfg)
        server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, access_log=args.log_level == "info",
                                               timeout_graceful_shutdown=args.drain_timeout))
        host, port = sock.getsockname()[:2]
        print(f"jambalab serve: {name} on http://{_url_host(host)}:{port}/v1 (Ctrl-C to stop)", flush=True)
        if not _is_loopback(args.host) and not args.api_key:
            print("jambalab serve: warning: listening beyond this machine without --api-key", file=sys.stderr)
        _quiet_signals()
        server.run(sockets=[sock])  # returns once a signal has stopped it and open requests have drained
    finally:
        engine.stop(drain=False, timeout=args.drain_timeout)  # uvicorn drained the requests; cancel any left
    print("jambalab serve: stopped", flush=True)
    return 0


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def served_name(args: argparse.Namespace) -> str:
    if args.model:
        return Path(args.model).resolve().name
    return args.preset or Path(args.config).stem


def _quiet_signals() -> None:
    # uvicorn catches SIGINT/SIGTERM while it runs, drains, then re-raises the signal to the handler
    # that was installed before it; a no-op there makes a requested shutdown exit 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)


def _is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "::1", "localhost") or host.startswith("127.")


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
