"""``python -m magicstudio`` (e.g. under ``accelerate launch -m magicstudio``) is the ``magicstudio`` command."""

import sys

from magicstudio.cli.main import main

sys.exit(main())
