#!/usr/bin/env bash
# Prints the path of an llvm-profdata that reads the profiles rustc's LLVM writes (the same major
# version), or nothing: rustup's llvm-tools first, then llvm-profdata-N and llvm-profdata on PATH.
# With --major, prints rustc's LLVM major version instead.
set -uo pipefail

major="$(${RUSTC:-rustc} -vV 2>/dev/null | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')"
[[ -n "$major" ]] || exit 0
if [[ "${1:-}" == --major ]]; then
    echo "$major"
    exit 0
fi
sysroot="$(${RUSTC:-rustc} --print sysroot 2>/dev/null)"
for tool in "$sysroot"/lib/rustlib/*/bin/llvm-profdata "$(command -v "llvm-profdata-$major")" \
    "$(command -v llvm-profdata)"; do
    [[ -x "$tool" ]] || continue
    if "$tool" --version 2>/dev/null | grep -Eq "LLVM version $major\."; then
        echo "$tool"
        exit 0
    fi
done
