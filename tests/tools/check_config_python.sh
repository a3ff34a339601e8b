#!/usr/bin/env bash
# Stands in for `python` in a training script: `$0 -m verl.trainer.main ARGS` only loads and
# validates the config those ARGS describe (no model is loaded), then prints it as JSON.
set -euo pipefail
[[ "$1" == "-m" && "$2" == "verl.trainer.main" ]] || { echo "unexpected call: $*" >&2; exit 2; }
shift 2
exec "$CHECK_PYTHON" -c 'import json, sys
from verl.trainer.config import PPOConfig
from verl.utils.config import load_config, to_dict
print(json.dumps(to_dict(load_config(sys.argv[1:], PPOConfig))))' "$@"
