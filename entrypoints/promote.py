"""MLproject entry point `promote`: `mlflow run . -e promote -P key=value --env-manager local`.

Thin on purpose: parameters (declared and undeclared `-P`) go to `peft-arena promote`, which resumes the run
`mlflow run` created and calls the stage.
"""

import sys

from peft_arena.cli import main

if __name__ == "__main__":
    sys.exit(main(["promote", *sys.argv[1:]]))
