"""MLproject entry point `train_sft`: `mlflow run . -e train_sft -P key=value --env-manager local`.

Thin on purpose: parameters (declared and undeclared `-P`) go to `peft-arena train-sft`, which resumes the run
`mlflow run` created and calls the stage.
"""

import sys

from peft_arena.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-sft", *sys.argv[1:]]))
