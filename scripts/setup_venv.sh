# Sourced by scripts/main_job.sh and scripts/test.sh: creates .venv (once, with $PYTHON or
# python3) and installs the package into it, editable, with the extras named by the
# argument ("" or "dev"). Expects the repository root as the working directory.
setup_venv() {
  local extras=${1:-}
  if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
  fi
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".${extras:+[$extras]}"
}
