"""Stand-in of ai-toolkit's run.py: run the job of each config file (JSON or YAML)."""

import json
import os
import sys

sys.path.insert(0, os.getcwd())


def load_config(path):
    with open(path, encoding="utf-8") as f:
        if path.endswith((".yaml", ".yml")):
            import yaml

            return yaml.safe_load(f)
        return json.load(f)


def main(argv=None):
    from jobs.ExtensionJob import ExtensionJob

    for path in (argv if argv is not None else sys.argv[1:]):
        job = ExtensionJob(load_config(path))
        job.run()


if __name__ == "__main__":
    main()
