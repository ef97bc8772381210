"""The ``magicstudio`` command. Each sub-command lives in its own module and registers itself here."""

from __future__ import annotations

import logging
import os
import sys

import typer

from ..errors import UserError

app = typer.Typer(
    name="magicstudio",
    help="Personalised studio portraits with Stable Diffusion (MagiCapture, MagicFace, MagicTailor).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _register() -> None:
    # Imported here so `magicstudio --help` stays quick and a broken optional command cannot break the others.
    from . import commands  # noqa: F401  (each module adds its commands to `app`)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("MAGICSTUDIO_LOGLEVEL", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    _register()
    try:
        app(args=argv, standalone_mode=False)
    except UserError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        return 2
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True)
        return 130
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        return 1
    except Exception as exc:  # click usage errors (typer vendors its own click) come through here
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):
            exc.show()
            return int(exc.exit_code)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
