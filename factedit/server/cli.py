"""`factedit serve`: load the model, replay the journal, serve the HTTP API with uvicorn.

Writes (edit, revert, import, export, compact) always need the bearer token. Without `--token-file` or
`FACTEDIT_API_TOKEN` the server uses the token kept in `<cache>/serve-token` (created, mode 0600, on
first use; made 0600 again, with a warning, if it was looser) and says where it is; on an address that
is not loopback it refuses to start instead. A `--token-file` other users may read is refused.

uvicorn runs with the h11 protocol and a deadline on each request head (connections.py), the
keep-alive timeout of the server config, and without proxy headers: every client here could set
X-Forwarded-For, which would let it pass for another (fairshare.py).
"""

from __future__ import annotations

import argparse
import logging
import os

from ..core.errors import ConfigError
from .config import TOKEN_ENV, ServerConfig, is_loopback

logger = logging.getLogger(__name__)

DEFAULT_PORT = 8000


def add_parser(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="serve the edited model over HTTP (OpenAI-compatible) and take edits")
    serve.add_argument("--model", default="default", help="'default' (embedded SmolLM2-135M) or a local folder")
    serve.add_argument("--journal", help="journal file (default: <cache>/journals/edits-<model>.sqlite)")
    serve.add_argument("--method", default=None,
                       help="method of edits that name none (default: mend on a model its trained editor fits, "
                            "else ultraedit)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=int(os.environ.get("PORT", DEFAULT_PORT)))
    serve.add_argument("--token-file", help=f"file holding the bearer token (else ${TOKEN_ENV})")
    serve.add_argument("--open-reads", action="store_true", help="completions, history and diffs without a token")
    serve.add_argument("--max-batch", type=int, default=8, help="prompts generated together")
    serve.add_argument("--max-queue", type=int, default=64, help="generations queued or running before 503")
    defaults = ServerConfig()
    serve.add_argument("--max-queue-per-client", type=int, default=defaults.max_queue_per_client,
                       help="generations one client (peer address) may have queued or running before 429")
    serve.add_argument("--max-in-flight", type=int, default=defaults.max_in_flight,
                       help="requests handled at once (health aside) before 503")
    serve.add_argument("--keep-alive-s", type=float, default=defaults.keep_alive_s,
                       help="seconds an idle keep-alive connection stays open")
    serve.add_argument("--header-timeout-s", type=float, default=defaults.header_timeout_s,
                       help="seconds a connection has to send a whole request head")
    serve.add_argument("--body-timeout-s", type=float, default=defaults.body_timeout_s,
                       help="seconds a request has to send its whole body (else 408)")
    serve.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    serve.add_argument("--guard", type=float, default=1.5, help="largest allowed drift (perplexity ratio) per edit")
    serve.set_defaults(func=serve_command)


def resolve_token(token_file: str | None, host: str) -> str:
    """The token from the file or the environment, else the one kept in the cache (loopback only)."""
    from .security import load_token, new_token_file, owner_only  # the HTTP stack, loaded only to serve

    token = load_token(token_file)
    if token is not None:
        return token
    if not is_loopback(host):
        raise ConfigError(f"refusing to serve on {host} (not a loopback address) without a token: "
                          f"give --token-file or set {TOKEN_ENV}")
    from ..model.loading import cache_dir

    path = cache_dir() / "serve-token"
    token = ""
    if path.is_file():
        owner_only(path)
        token = path.read_text().strip()
    if not token:
        token = new_token_file(path)
    logger.info("bearer token for edits: in %s", path)
    return token


def serve_command(args: argparse.Namespace) -> int:
    import uvicorn

    from ..session import EditSession, SessionConfig
    from .app import create_app
    from .connections import header_timeout_protocol

    token = resolve_token(args.token_file, args.host)
    server_config = ServerConfig(host=args.host, port=args.port, token=token, open_reads=args.open_reads,
                                 max_batch=args.max_batch, max_queue=args.max_queue,
                                 max_queue_per_client=args.max_queue_per_client, max_in_flight=args.max_in_flight,
                                 keep_alive_s=args.keep_alive_s, header_timeout_s=args.header_timeout_s,
                                 body_timeout_s=args.body_timeout_s)
    session_config = SessionConfig(model=args.model, journal=args.journal or "", default_method=args.method,
                                   torch_threads=args.threads, guard_max_ratio=args.guard)
    session = EditSession(session_config)
    if session.journal_error:
        logger.error("the journal cannot be used (%s); serving read-only", session.journal_error)
    active = sum(r.status == "active" for r in session.history())
    logger.info("model %s, journal %s, %d active edit(s)", session.model_id, session.journal_path, active)
    try:
        uvicorn.run(create_app(session, server_config), host=args.host, port=args.port, log_level="info",
                    http=header_timeout_protocol(server_config.header_timeout_s),
                    timeout_keep_alive=server_config.keep_alive_s, proxy_headers=False)
    finally:
        session.close()
    return 0
