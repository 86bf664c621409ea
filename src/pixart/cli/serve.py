"""`pixart serve`: the web UI and HTTP API (:mod:`pixart.serve.app`) on one loaded model."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import socket
import tempfile
from pathlib import Path

from pixart.errors import PixArtError

log = logging.getLogger(__name__)

EXAMPLES = """examples:
  pixart serve --model PixArt-alpha/PixArt-Sigma-XL-2-1024-MS          # then open http://127.0.0.1:7860
  pixart serve --model ./my-pipeline --transformer finetuned.pth --port 8000 --out renders/
  curl -s http://127.0.0.1:7860/api/generate -H 'content-type: application/json' \\
       -d '{"prompt": "a red fox in the snow", "seed": 1}'
"""


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
    m.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, fp16 on GPU), fp32, fp16 or bf16")
    m.add_argument("--low-memory", action="store_true", help="load T5, transformer and VAE one at a time")

    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=7860, help="port to listen on (default 7860)")
    s.add_argument("--out", type=Path, help="keep the generated PNGs in this folder (default: a temporary one)")
    s.add_argument("--concurrency", type=int, default=defaults.concurrency, help="generations at once (default 1)")
    s.add_argument(
        "--max-queue", type=int, default=defaults.max_queue, help=f"requests waiting (default {defaults.max_queue})"
    )

    lim = p.add_argument_group("limits per request (refused with a message beyond these)")
    lim.add_argument("--max-prompt-chars", type=int, default=defaults.max_prompt_chars, help="default %(default)s")
    lim.add_argument("--max-pixels", type=int, default=defaults.max_pixels, help="per image (default 2048 × 2048)")
    lim.add_argument("--max-images", type=int, default=defaults.max_images, help="default %(default)s")
    lim.add_argument("--max-steps", type=int, default=defaults.max_steps, help="default %(default)s")
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
    )
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise PixArtError(f"--out {args.out} exists and is not a folder")
    # Bound before the (slow) imports and model load, so a taken port or bad host fails at once, and no
    # other process can take the port while the model loads.
    sock = listening_socket(args.host, args.port)
    missing = [name for name in ("gradio", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:  # found without importing: gradio takes seconds to import, the model loads first
        raise PixArtError(f"pixart serve needs {' and '.join(missing)}: pip install 'pixart[serve]'")
    if args.host in ("0.0.0.0", "::", ""):
        log.warning("listening on all interfaces (%s): anyone who can reach this machine can use the server", args.host)

    import uvicorn

    from pixart.inference.pipeline import PixArtPipeline
    from pixart.serve.app import ImageService, build_app

    pipe = PixArtPipeline.from_pretrained(
        args.model, args.transformer, device=args.device, dtype=args.dtype, low_memory=args.low_memory
    )
    with tempfile.TemporaryDirectory(prefix="pixart-serve-") as tmp:
        out = args.out or Path(tmp)
        app = build_app(ImageService(pipe, limits, out))
        url_host = f"[{args.host}]" if ":" in args.host else args.host
        log.info("serving on http://%s:%d (API: POST /api/generate); images in %s", url_host, args.port, out)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        server.run(sockets=[sock])
    return 0


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
