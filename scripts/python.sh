# Sourced by setup.sh, pretrain.sh and test.sh: sets PY, the Python every script uses.
#   an active virtual environment's; else the project's own .venv when it exists; else `python`/`python3` on PATH
#   when pip may install into it; else (a system Python managed by the OS, PEP 668, as on Debian 12/13) a new .venv,
#   with Debian's python3-venv installed first when it is missing and we are root.
if [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then
  PY="$VIRTUAL_ENV/bin/python"
elif [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
else
  base=$(command -v python || command -v python3) || {
    echo "error: no python or python3 on PATH; install Python 3.10+ (Debian: apt-get install python3 python3-venv)" >&2
    exit 1
  }
  if "$base" -c 'import os, sys, sysconfig  # PEP 668: the marker binds only outside a virtual environment
sys.exit(sys.prefix == sys.base_prefix and os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")))'; then
    PY="$base"
  else
    echo "setup: $base is managed by the system (PEP 668), so packages go into a project virtual environment: .venv" >&2
    if ! "$base" -c "import ensurepip, venv" 2>/dev/null; then
      if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
      else
        echo "error: $base cannot make a virtual environment; as root run: apt-get install python3-venv" \
             "(or activate a virtual environment of your own), then run this again" >&2
        exit 1
      fi
    fi
    "$base" -m venv .venv
    PY=.venv/bin/python
  fi
fi
