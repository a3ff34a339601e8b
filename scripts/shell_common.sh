# Sourced, never run, by the shell scripts in train_examples/, validation_examples/ and Evaluation/,
# so that they agree on the interpreter and on --help:
#
# PYTHON  the caller's $PYTHON when set; else this repository's .venv/bin/python when it exists
#         (the environment `bash setup.sh` builds: a bare python3 outside it lacks torch and verl),
#         found from this file's own place so that the working directory does not matter; else
#         python3 from the PATH.
# exit_with_help_if_asked FILE... -- ARGS...
#         with -h or --help among ARGS, prints each FILE's header comment and exits 0. Scripts that
#         build or train before their Python command sees the arguments call it first, so that
#         asking for help never starts that work.

VISION_SR1_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$VISION_SR1_ROOT/.venv/bin/python" ]]; then
    PYTHON="$VISION_SR1_ROOT/.venv/bin/python"
  else
    PYTHON=python3
  fi
fi

# The comment block at the top of a file (after its #! line), without the leading '# '.
print_header() {
  sed -n '2,${/^#/!q;s/^# \{0,1\}//;p;}' "$1"
}

exit_with_help_if_asked() {
  local files=() arg file
  while [[ $# -gt 0 && $1 != -- ]]; do files+=("$1"); shift; done
  [[ $# -gt 0 ]] && shift
  for arg in "$@"; do
    if [[ $arg == -h || $arg == --help ]]; then
      for file in "${files[@]}"; do print_header "$file"; done
      exit 0
    fi
  done
}
