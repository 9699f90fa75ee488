# What run.sh and instructions.sh share: where things are, messages, packages, the load
# generator, the gateway's build, free ports, filling in config templates and the canned
# upstream's files. Sourced, not run.

BENCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$BENCH_DIR/../.." && pwd)"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
[[ "$TARGET_DIR" = /* ]] || TARGET_DIR="$ROOT/$TARGET_DIR"
TOOLS="$TARGET_DIR/bench-tools"
FIXTURES="$ROOT/tests/fixtures"
JSON_FIXTURE="$FIXTURES/vllm-responses-toolcall-gpt-oss-20b.json"
SSE_FIXTURE="$FIXTURES/vllm-responses-stream-gpt-oss-20b.sse"

export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

log()  { printf '>> %s\n' "$*" >&2; }
warn() { printf '!! %s\n' "$*" >&2; }
die()  { printf 'error: %s\n' "$*" >&2; exit 1; }

APT_UPDATED=0
SUDO=()
apt_update() {
    (( ! APT_UPDATED )) || return 0
    if [[ $EUID -ne 0 ]]; then
        command -v sudo >/dev/null || die "need root (or sudo) to install packages with apt-get"
        SUDO=(sudo)
    fi
    log "apt-get update"
    "${SUDO[@]}" apt-get update -q >/dev/null
    APT_UPDATED=1
}

apt_install() {
    apt_update
    log "apt-get install $*"
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >/dev/null
}

# install_oha: OHA is oha from PATH, or the one cargo installs under TOOLS; fails if neither.
install_oha() {
    if command -v oha >/dev/null; then
        OHA=oha
        return 0
    fi
    OHA="$TOOLS/oha/bin/oha"
    [[ ! -x "$OHA" ]] || return 0
    log "cargo install oha --locked (into $TOOLS/oha)"
    mkdir -p "$TOOLS"
    cargo install oha --locked --root "$TOOLS/oha" >"$TOOLS/oha-install.log" 2>&1 && return 0
    warn "cargo install oha failed (see $TOOLS/oha-install.log)"
    return 1
}

# build_gateway: GATEWAY is GATEWAY_BIN, or the release build, built now (`make build`: profile-
# guided where it can be, see the Makefile); fails if the build does. GATEWAY_BUILD says which,
# as the build's own commands (`make -n`) tell it.
build_gateway() {
    if [[ -n "${GATEWAY_BIN:-}" ]]; then
        GATEWAY="$GATEWAY_BIN"
        GATEWAY_BUILD="GATEWAY_BIN"
        log "gateway: $GATEWAY (GATEWAY_BIN, not building)"
        return 0
    fi
    GATEWAY_BUILD="release build"
    if make -C "$ROOT" --no-print-directory -n build 2>/dev/null | grep -q -- -Cprofile-use=; then
        GATEWAY_BUILD="profile-guided release build"
    fi
    log "make build ($GATEWAY_BUILD)"
    GATEWAY=""
    make -C "$ROOT" --no-print-directory build >&2 || return 1
    GATEWAY="$TARGET_DIR/release/gateway"
}

# fill TEMPLATE OUT NAME=VALUE...: TEMPLATE with each @NAME@ replaced by its VALUE, into OUT; a
# placeholder left unfilled is an error.
fill() {
    local template="$1" out="$2" pair
    shift 2
    local -a edits=()
    for pair in "$@"; do edits+=(-e "s|@${pair%%=*}@|${pair#*=}|g"); done
    sed "${edits[@]}" "$template" >"$out"
    if grep -q '@[A-Z_]*@' "$out"; then die "unfilled placeholder in $out"; fi
}

# free_ports N: N loopback ports free right now, on one line.
free_ports() {
    python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

# stage_upstream DIR: the canned answers the nginx upstream serves (DIR/www, with DIR/tmp for
# its temporary files) and the JSON request the load sends (DIR/request.json).
stage_upstream() {
    [[ -f "$JSON_FIXTURE" && -f "$SSE_FIXTURE" ]] || die "fixtures missing under $FIXTURES"
    # nginx workers run as an unprivileged user when started as root and must read the bodies.
    chmod 755 "$1"
    mkdir -p "$1/www" "$1/tmp"
    cp "$JSON_FIXTURE" "$1/www/response.json"
    cp "$SSE_FIXTURE" "$1/www/response.sse"
    chmod 644 "$1/www/"*
    chmod 755 "$1/www"
    printf '{"model":"m","input":"hello","stream":false}' >"$1/request.json"
}
