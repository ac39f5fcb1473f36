"""MLproject entry point `arena`: `mlflow run . -e arena -P methods=lora,oft -P domains=math,med --env-manager local`.

Thin on purpose: parameters (declared and undeclared `-P`) go to `peft-arena arena`, which resumes the run
`mlflow run` created as the sweep's parent run and runs the chains as its child runs.
"""

import sys

from peft_arena.cli import main

if __name__ == "__main__":
    sys.exit(main(["arena", *sys.argv[1:]]))
