# Helpers the bash scripts share. Source it first:  . "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# Sets ROOT (the repository); log lines carry the calling script's name.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SCRIPT_NAME=$(basename "$0")

log() { echo "$SCRIPT_NAME: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
# Runs a command silently, showing its output only when it fails.
quiet() { local out; out=$("$@" 2>&1) || { echo "$out" >&2; die "failed: $*"; }; }

# The version terraform/versions.tf pins for provider NAME.
pinned_provider() { sed -n "/$1 = {/,/}/s/.*version *= *\"\\([^\"]*\\)\".*/\\1/p" "$ROOT/terraform/versions.tf"; }

# The go binary: on PATH, else Go's own or Debian's install location; nothing when there is none.
go_binary() {
    local candidate
    for candidate in "$(command -v go 2>/dev/null)" /usr/local/go/bin/go /usr/lib/go/bin/go; do
        if [ -n "$candidate" ] && [ -x "$candidate" ]; then echo "$candidate"; return 0; fi
    done
}

# The Python virtualenv .venv, (re)installed when the requirements change (their hash is kept inside).
ensure_venv() {
    local venv=$ROOT/.venv req_hash
    req_hash=$(cat "$ROOT/requirements.txt" "$ROOT/requirements-dev.txt" | sha256sum | cut -d' ' -f1)
    if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.requirements.sha256" 2>/dev/null)" != "$req_hash" ]; then
        log "installing Python requirements into .venv"
        [ -x "$venv/bin/python" ] || quiet python3 -m venv "$venv"
        quiet "$venv/bin/pip" install --disable-pip-version-check -q -r "$ROOT/requirements-dev.txt"
        echo "$req_hash" >"$venv/.requirements.sha256"
    fi
}
