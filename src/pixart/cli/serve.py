"""`pixart serve`: the web UI and HTTP API (:mod:`pixart.serve.app`) on one loaded model."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import signal
import socket
import tempfile
from pathlib import Path

from pixart.errors import PixArtError
from pixart.serve.guard import Access, host_name, is_loopback, parse_rate

log = logging.getLogger(__name__)

EXAMPLES = """examples:
  pixart serve --model PixArt-alpha/PixArt-Sigma-XL-2-1024-MS          # then open http://127.0.0.1:7860
  pixart serve --model ./my-pipeline --transformer finetuned.pth --port 8000 --out renders/
  pixart serve --lora style=runs/style-lora:0.8 --lora runs/detail.safetensors   # requests choose among them
  pixart serve --model PixArt-alpha/PixArt-XL-2-512x512 --controlnet edges=PixArt-XL-2-512-ControlNet.pth
  curl -s http://127.0.0.1:7860/api/generate -H 'content-type: application/json' \\
       -d '{"prompt": "a small red circle above a blue square", "seed": 1}'    # the bundled demo, 64 × 64
  python -c 'import secrets; print(secrets.token_urlsafe())' > token.txt   # sharing on the network:
  pixart serve --host 0.0.0.0 --auth-token-file token.txt --allowed-host studio.lan
"""
TOKEN_ENV = "PIXART_AUTH_TOKEN"
MIN_TOKEN_CHARS = 16  # the page's login form has no attempt limit: a short token could be guessed


def register(subparsers: argparse._SubParsersAction) -> None:
    from pixart.serve.app import ServeLimits

    defaults = ServeLimits()
    p = subparsers.add_parser(
        "serve",
        help="web UI and HTTP API for generating images",
        description="Serve a Gradio web UI and a JSON HTTP API (POST /api/generate) for one PixArt model, "
        "loaded once. Requests queue for a limited number of generation slots. Needs the serve extra: "
        "pip install 'pixart[serve]'.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    m = p.add_argument_group("model")
    m.add_argument("--model", help="diffusers pipeline folder or hub id (default: the bundled demo model)")
    m.add_argument("--transformer", help="other transformer weights: official .pth, pixart .safetensors or a folder")
    m.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: the best available)")
    m.add_argument(
        "--dtype",
        default="auto",
        help="auto (bf16 on a CPU with bf16 units, fp32 on other CPUs, fp16 on GPU), fp32, fp16 or bf16",
    )
    m.add_argument("--low-memory", action="store_true", help="load T5, transformer and VAE one at a time")
    m.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="[NAME=]PATH[:SCALE]",
        help="a LoRA requests may choose by NAME (default: the file or folder name), merged at SCALE unless the "
        "request gives one (default 1); repeatable",
    )
    m.add_argument(
        "--controlnet",
        action="append",
        default=[],
        metavar="[NAME=]PATH",
        help="a ControlNet (official .pth or pixart .safetensors) that requests with a control image steer by, "
        "chosen by NAME (default: the file name) when several are loaded; repeatable",
    )

    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=7860, help="port to listen on (default 7860)")
    s.add_argument("--out", type=Path, help="keep the generated PNGs in this folder (default: a temporary one)")
    s.add_argument("--concurrency", type=int, default=defaults.concurrency, help="generations at once (default 1)")
    s.add_argument(
        "--max-queue", type=int, default=defaults.max_queue, help=f"requests waiting (default {defaults.max_queue})"
    )
    s.add_argument("--log-prompts", action="store_true", help="write each request's prompt in the request log")
    s.add_argument(
        "--allow-any-size",
        action="store_true",
        help="accept sizes the model records it was never trained at (refused by default; the demo knows 64 × 64)",
    )

    a = p.add_argument_group(
        "access (requests must name this server in Host, come from its own page if from a page at all, "
        "and send JSON to the API)"
    )
    a.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="another name clients reach the server by (a LAN name, a proxy's); repeatable",
    )
    a.add_argument(
        "--auth-token-file",
        type=Path,
        metavar="PATH",
        help=f"file holding the token the API (Authorization: Bearer) and the page's login require; or set {TOKEN_ENV}",
    )
    a.add_argument("--auth-token", metavar="TOKEN", help="the token itself (other users see it in ps: prefer a file)")
    a.add_argument("--no-auth", action="store_true", help="serve a non-loopback --host without a token")

    lim = p.add_argument_group("limits per request (refused with a message beyond these)")
    lim.add_argument("--max-prompt-chars", type=int, default=defaults.max_prompt_chars, help="default %(default)s")
    lim.add_argument("--max-pixels", type=int, default=defaults.max_pixels, help="per image (default 2048 × 2048)")
    lim.add_argument("--max-images", type=int, default=defaults.max_images, help="default %(default)s")
    lim.add_argument("--max-steps", type=int, default=defaults.max_steps, help="default %(default)s")
    lim.add_argument(
        "--max-work",
        type=int,
        help="pixels × steps × images (default: the model's default size × 100 steps (ddpm's default) × --max-images)",
    )
    lim.add_argument("--max-body", type=int, default=defaults.max_body, help="bytes per request body (default 8 MiB)")
    lim.add_argument("--body-timeout", type=int, default=defaults.body_timeout, help="seconds to send a body (30)")
    lim.add_argument(
        "--header-timeout",
        type=int,
        default=defaults.header_timeout,
        help="seconds to send the request headers, so slow clients cannot hold connections (10)",
    )
    lim.add_argument("--rate-limit", default=f"{defaults.rate_limit}/min", help="per client address (%(default)s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pixart.serve.app import ServeLimits

    limits = ServeLimits(
        max_prompt_chars=args.max_prompt_chars,
        max_pixels=args.max_pixels,
        max_images=args.max_images,
        max_steps=args.max_steps,
        concurrency=args.concurrency,
        max_queue=args.max_queue,
        max_work=args.max_work,
        max_body=args.max_body,
        body_timeout=args.body_timeout,
        header_timeout=args.header_timeout,
        rate_limit=parse_rate(args.rate_limit),
    )
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise PixArtError(f"--out {args.out} exists and is not a folder")
    hosts = tuple(host_name(h) for h in args.allowed_host)
    if "" in hosts:
        raise PixArtError("--allowed-host needs a name, e.g. --allowed-host studio.lan")
    loras = served_loras(args.lora)
    controlnets = served_controlnets(args.controlnet)
    if loras and args.low_memory:
        raise PixArtError("--lora needs the transformer kept loaded; drop --low-memory")
    token = auth_token(args)
    access = Access(
        bind_host=args.host,
        allowed_hosts=hosts,
        token=token,
        max_body=limits.max_body,
        body_timeout=limits.body_timeout,
    )
    # Bound before the (slow) imports and model load, so a taken port or bad host fails at once, and no
    # other process can take the port while the model loads.
    sock = listening_socket(args.host, args.port)
    missing = [name for name in ("gradio", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:  # found without importing: gradio takes seconds to import, the model loads first
        raise PixArtError(f"pixart serve needs {' and '.join(missing)}: pip install 'pixart[serve]'")
    if token is None and not is_loopback(args.host):
        log.warning("listening on %s with --no-auth: anyone who can reach this machine can use the server", args.host)

    import uvicorn

    from pixart.inference.pipeline import PixArtPipeline
    from pixart.serve.app import ImageService, build_app
    from pixart.serve.inputs import ServedControlNet
    from pixart.serve.slow_clients import header_deadline_protocol

    previous = signal.signal(signal.SIGTERM, _leave)
    try:
        pipe = PixArtPipeline.from_pretrained(
            args.model, args.transformer, device=args.device, dtype=args.dtype, low_memory=args.low_memory
        )
        loaded = tuple(
            ServedControlNet.load(name, path, pipe.model_config, pipe.device, pipe.dtype) for name, path in controlnets
        )
        with tempfile.TemporaryDirectory(prefix="pixart-serve-") as tmp:
            out = args.out or Path(tmp)
            service = ImageService(
                pipe,
                limits,
                out,
                log_prompts=args.log_prompts,
                loras=loras,
                allow_any_size=args.allow_any_size,
                controlnets=loaded,
            )
            app = build_app(service, access)
            url_host = f"[{args.host}]" if ":" in args.host else args.host
            log.info("serving on http://%s:%d (API: POST /api/generate); images in %s", url_host, args.port, out)
            if token is not None:
                log.info("the API and the page require the token (user name: any, password: the token)")
            # timeout_keep_alive: a kept-alive connection idle for 5 s is closed (uvicorn's default, said here).
            config = uvicorn.Config(
                app,
                http=header_deadline_protocol(limits.header_timeout),
                log_level="warning",
                timeout_graceful_shutdown=5,
                timeout_keep_alive=5,
            )
            uvicorn.Server(config).run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def _leave(signum: int, frame) -> None:
    """SIGTERM: leave through the ``with`` blocks, so the temporary image folder is removed, and exit 0.

    uvicorn stops gracefully on SIGTERM and then sends it again to the handler it found, this one; the
    default handler would kill the process before the folder is removed.
    """
    raise SystemExit(0)


def served_loras(specs: list[str]):
    """The ``--lora [NAME=]PATH[:SCALE]`` flags as ServedLora, each named once and found on disk."""
    from pixart.checkpoints.lora import parse_lora_spec
    from pixart.demo import BUNDLED_LORAS
    from pixart.serve.app import ServedLora

    what = "a LoRA folder or .safetensors file, or a bundled LoRA: " + ", ".join(BUNDLED_LORAS)
    named = _named(specs, "--lora", what, parse_lora_spec, bundled=BUNDLED_LORAS)
    return tuple(ServedLora(name, *parsed) for name, parsed in named)


def served_controlnets(specs: list[str]) -> list[tuple[str, str]]:
    """The ``--controlnet [NAME=]PATH`` flags as (name, path), each named once and found on disk."""
    from pixart.demo import BUNDLED_CONTROLNETS

    what = "an official ControlNet .pth or a pixart .safetensors, or a bundled one: " + ", ".join(BUNDLED_CONTROLNETS)
    suffixes = (".safetensors", ".pth", ".pt")
    named = _named(specs, "--controlnet", what, lambda path: (path,), suffixes=suffixes, bundled=BUNDLED_CONTROLNETS)
    return [(name, path) for name, (path,) in named]


def _named(
    specs: list[str], flag: str, what: str, parse, suffixes=(".safetensors",), bundled=()
) -> list[tuple[str, tuple]]:
    """(name, parse(REST)) of each ``[NAME=]REST`` flag, whose path ``parse(REST)[0]`` must exist or be one of the
    ``bundled`` names (which the loaders resolve); the name defaults to the file's without ``suffixes``, and no
    name may repeat."""
    import re

    named: dict[str, tuple] = {}
    for spec in specs:
        given = re.fullmatch(r"([\w.-]+)=(.+)", spec)
        parsed = parse(given[2] if given else spec)
        name = given[1] if given else Path(parsed[0]).name
        for suffix in suffixes if not given else ():
            name = name.removesuffix(suffix)
        if not Path(parsed[0]).exists() and str(parsed[0]) not in bundled:
            raise PixArtError(f"{flag} {spec}: {parsed[0]} does not exist; give {what}")
        if name in named:
            raise PixArtError(f"{flag} {spec}: the name {name!r} is taken; name it with {flag} NAME=PATH")
        named[name] = parsed
    return list(named.items())


def auth_token(args: argparse.Namespace) -> str | None:
    """The token the server requires, from --auth-token-file, --auth-token or the environment; never echoed."""
    given = [name for name in ("auth_token", "auth_token_file") if getattr(args, name) is not None]
    if len(given) > 1:
        raise PixArtError("give the token once: --auth-token or --auth-token-file, not both")
    if args.auth_token_file is not None:
        try:
            token = args.auth_token_file.read_text().strip()
        except OSError as err:
            raise PixArtError(f"--auth-token-file {args.auth_token_file}: {err.strerror}") from None
        source = f"--auth-token-file {args.auth_token_file}"
    elif args.auth_token is not None:
        token, source = args.auth_token.strip(), "--auth-token"
    else:
        token, source = os.environ.get(TOKEN_ENV, "").strip() or None, TOKEN_ENV
    if token is not None and args.no_auth:
        raise PixArtError(f"--no-auth contradicts the token given by {source}; drop one of them")
    if token is not None and (len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token)):
        raise PixArtError(
            f"the token from {source} must be at least {MIN_TOKEN_CHARS} characters without spaces; "
            "make one with: python -c 'import secrets; print(secrets.token_urlsafe())'"
        )
    if token is None and not args.no_auth and not is_loopback(args.host):
        raise PixArtError(
            f"--host {args.host} lets other machines in: give a token with --auth-token-file PATH, --auth-token "
            f"or {TOKEN_ENV}, or pass --no-auth to serve without one"
        )
    return token


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (not yet listening), or a one-line error naming what is wrong."""
    if not 1 <= port <= 65535:
        raise PixArtError(f"--port {port} is not a port number; use 1–65535 (default 7860)")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as err:
        raise PixArtError(f"--host {host!r} is not an address of this machine: {err.strerror}") from None
    sock = socket.socket(family, kind, proto)
    # As uvicorn does: a port left in TIME_WAIT by a previous run can be reused at once.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise PixArtError(f"cannot listen on {host}:{port}: {err.strerror}; pick another --port or --host") from None
    return sock
