"""`python -m deepgen_trainer.train`: see the package's docstring and `--help`."""

import sys

from deepgen_trainer.train.loop import main

sys.exit(main())
