"""`parakeet-openai`: run the OpenAI-compatible gateway (uvicorn) in front of a Triton server.

    parakeet-openai --triton-url HOST:8001 --port 9000 [--api-key-file FILE] [--max-upload-mb 512] ...
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from .settings import build_parser, config_from_args

    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as error:
        print(f"parakeet-openai: error: {error}", file=sys.stderr)
        return 2
    import uvicorn

    from .app import create_app

    auth = "API key required" if config.api_key else "no API key (set PARAKEET_API_KEY or --api-key-file to require one)"
    print(f"parakeet-openai: http://{config.host}:{config.port}/v1 -> Triton {config.triton_url} "
          f"model '{config.triton_model}', served as '{config.model_id}'; {auth}", file=sys.stderr, flush=True)
    # uvicorn: SIGTERM / SIGINT stop accepting connections and let the requests in flight finish.
    uvicorn.run(create_app(config), host=config.host, port=config.port, log_level=config.log_level,
                access_log=False, timeout_graceful_shutdown=int(config.request_timeout_s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
