#!/usr/bin/env bash
# The whole test suite: makes sure PostgreSQL, Redis and the toolchain are
# there (scripts/setup.sh), then runs every test of the workspace against
# them. Extra arguments go to `cargo test` (e.g. `scripts/test.sh -- --nocapture`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh

# rustup's cargo lives in ~/.cargo/bin (or /usr/lib/rustup/bin with Debian's
# rustup package), which a fresh shell may not have on PATH.
for dir in /usr/lib/rustup/bin "${CARGO_HOME:-$HOME/.cargo}/bin"; do
    if [ -d "$dir" ]; then PATH="$dir:$PATH"; fi
done
export PATH
export RUST_BACKTRACE=1

echo "test: cargo test --workspace --all-targets --no-fail-fast $*"
exec cargo test --workspace --all-targets --no-fail-fast "$@"
