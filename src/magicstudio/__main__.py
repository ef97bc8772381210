"""``python -m magicstudio`` (e.g. under ``accelerate launch -m magicstudio``) is the ``magicstudio`` command.

The entry point sits above every layer, so it adds the UI's ``magicstudio ui`` command (``magicstudio.ui``, which
the CLI layer below may not import) before handing over to the CLI."""

import sys


def main(argv=None) -> int:
    from magicstudio.cli.main import main as cli_main
    from magicstudio.ui import command  # noqa: F401  (registers `magicstudio ui`; imports gradio only when run)

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
