"""`python -m vaepipe` and the `vaepipe` command."""

import signal

from .stop import exit_interrupted, terminate


def main() -> None:
    signal.signal(signal.SIGTERM, terminate)
    try:
        from .cli import main as cli  # torch and diffusers: seconds, during which Ctrl-C ends it like any other
    except KeyboardInterrupt:
        exit_interrupted()
    cli()


if __name__ == "__main__":
    main()
