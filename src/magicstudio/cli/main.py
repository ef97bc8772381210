"""The ``magicstudio`` command. Each sub-command lives in its own module and registers itself here."""

from __future__ import annotations

import logging
import os
import sys
import warnings

import typer

from ..errors import UserError

app = typer.Typer(
    name="magicstudio",
    help="Personalised studio portraits with Stable Diffusion (MagiCapture, MagicFace, MagicTailor).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)


#: libraries whose start-up notices a user cannot act on (e.g. transformers' "`CLIPImageProcessor` requires
#: torchvision ... falling back", "mean_resizing", torchvision/diffusers deprecations); ``-v`` shows them again
QUIET_LIBRARIES = ("transformers", "diffusers", "torchvision", "peft", "accelerate", "huggingface_hub", "timm")


def quiet_libraries() -> None:
    """Silence the libraries' own warnings and notices, once, before any of them is imported; magicstudio's own
    warnings (its loggers, ``warning:`` lines) stay."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # tensorboard's TensorFlow probe
    pattern = "|".join(QUIET_LIBRARIES)
    warnings.filterwarnings("ignore", module=rf"({pattern})(\.|$)")
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.ERROR)


def _verbose(argv: list[str]) -> bool:
    """``-v`` / ``--verbose`` before the command name (``magicstudio -v capture train ...``)."""
    for arg in argv:
        if arg in ("-v", "--verbose"):
            return True
        if not arg.startswith("-"):
            return False
    return False


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        typer.echo(f"magicstudio {__version__}")
        raise typer.Exit(0)


@app.callback()
def _options(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print magicstudio's version and exit."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Details: magicstudio's info messages and the "
                                 "libraries' own warnings (silenced otherwise). Before the command: magicstudio -v CMD."),
) -> None:
    """Personalised studio portraits with Stable Diffusion (MagiCapture, MagicFace, MagicTailor)."""


def _register() -> None:
    # Imported here so `magicstudio --help` stays quick and a broken optional command cannot break the others.
    from . import commands  # noqa: F401  (each module adds its commands to `app`)


_ARGV: list[str] = []  # the arguments of the running command (for the `--resume` hint)


def resume_command(extra: str = "--resume") -> str:
    """The running command line with ``extra`` added (once): what continues an interrupted run."""
    import shlex

    args = list(_ARGV) if _ARGV else sys.argv[1:]
    if extra not in args:
        args.append(extra)
    return shlex.join(["magicstudio", *args])


def interrupted(exc) -> "typer.Exit":
    """Ctrl-C during training (a ``training.feedback.TrainingInterrupted``): say where the checkpoint is and the
    exact command that continues the run; exit code 130, as for any Ctrl-C."""
    if exc.checkpoint is not None:
        typer.secho(f"interrupted at step {exc.step}/{exc.total}: checkpoint {exc.checkpoint}\n"
                    f"continue with: {resume_command()}", err=True, fg=typer.colors.YELLOW)
    else:
        typer.secho("interrupted before the first step finished: nothing to resume (start again)", err=True)
    return typer.Exit(131)  # 131: told already (main turns it into 130 without another "interrupted")


def main(argv: list[str] | None = None) -> int:
    global _ARGV
    _ARGV = list(argv) if argv is not None else sys.argv[1:]
    verbose = _verbose(_ARGV)
    if not verbose:
        quiet_libraries()
    level = "INFO" if verbose else os.environ.get("MAGICSTUDIO_LOGLEVEL", "WARNING")
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    _register()
    try:
        rv = app(args=argv, standalone_mode=False)
    except UserError as exc:
        return _fail(str(exc), 2)
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True)
        return 130
    except typer.Exit as exc:
        return 130 if exc.exit_code == 131 else exc.exit_code
    except typer.Abort:
        return 1
    except OSError as exc:  # the file system said no (exists, not a folder, permission, disk full, ...)
        where = f": {exc.filename}" if exc.filename else ""
        return _fail(f"{exc.strerror or exc}{where}", 2)
    except Exception as exc:
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):  # click usage errors (typer vendors its own click)
            exc.show()
            return int(exc.exit_code)
        if os.environ.get("MAGICSTUDIO_DEBUG"):
            raise
        first = (str(exc).strip().splitlines() or [""])[0]
        return _fail(f"unexpected {type(exc).__name__}: {first} (a bug in magicstudio? MAGICSTUDIO_DEBUG=1 shows "
                     "the traceback)", 1)
    # without standalone mode typer returns exit codes instead of raising: 130 for Ctrl-C, N for typer.Exit(N)
    if isinstance(rv, int) and not isinstance(rv, bool) and rv:
        if rv == 131:
            return 130
        if rv == 130:
            typer.secho("interrupted", err=True)
        return rv
    return 0


def _fail(message: str, code: int) -> int:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return code


if __name__ == "__main__":  # `python -m magicstudio.cli.main`: the commands register on the imported module's app
    from magicstudio.cli.main import main as _main

    sys.exit(_main())
