"""``python -m keras_insightface <subcommand> ...``: the same as the ``keras-insightface`` command."""

from keras_insightface.cli import main

raise SystemExit(main())
