"""MLproject entry point `evaluate`: `mlflow run . -e evaluate -P key=value --env-manager local`.

Thin on purpose: parameters (declared and undeclared `-P`) go to `peft-arena evaluate`, which resumes the run
`mlflow run` created and calls the stage.
"""

import sys

from peft_arena.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
