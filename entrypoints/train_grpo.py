"""MLproject entry point `train_grpo`: `mlflow run . -e train_grpo -P key=value --env-manager local`.

Thin on purpose: parameters (declared and undeclared `-P`) go to `peft-arena train-grpo`, which resumes the run
`mlflow run` created and calls the stage.
"""

import sys

from peft_arena.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-grpo", *sys.argv[1:]]))
