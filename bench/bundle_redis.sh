#!/usr/bin/env bash
# Bundle this machine's redis-server with every shared library it loads (libc and the dynamic
# loader included), for the GPU machine, which has no redis-server:
#   bash bench/bundle_redis.sh [--no-xz] [DEST]     # here, once; DEST defaults to .redis
# writes DEST/redis-server, DEST/lib/*.so* and the runner DEST/bin/redis-server, which starts
#   DEST/lib/ld-linux-x86-64.so.2 --library-path DEST/lib DEST/redis-server ARGS...
# so the host's glibc never matters (e.g. DEST/bin/redis-server --port 6399 --save '' --appendonly no).
# DEST (17 MB) plus the carried wheels (.whl, ~60 MB) exceed the device's 64 MiB carry limit,
# so it also writes DEST.tar.xz (5.5 MB; --no-xz skips it): carry that instead, and
# bench/bench_serving.py unpacks it. bench_serving.py uses redis-server from PATH if there is
# one, else DEST/bin (putting it on PATH, where baton.launcher.start_redis finds it).
set -euo pipefail
cd "$(dirname "$0")/.."
xz=1
if [ "${1:-}" = "--no-xz" ]; then xz=0; shift; fi
dest=${1:-.redis}
src=${REDIS_SERVER:-$(command -v redis-server || true)}
[ -n "$src" ] || { echo "bundle_redis: no redis-server here (apt-get install redis-server)" >&2; exit 1; }
rm -rf "$dest" "$dest.tar.xz"
mkdir -p "$dest/lib" "$dest/bin"
cp -L "$src" "$dest/redis-server"
# ldd lines: "libx.so => /path (0x...)", "/lib64/ld-linux-x86-64.so.2 (0x...)", "linux-vdso.so.1 (0x...)"
ldd "$src" | awk '{for (i = 1; i <= NF; i++) if ($i ~ /^\//) print $i}' | sort -u | while read -r lib; do
  cp -L "$lib" "$dest/lib/"
done
[ -f "$dest/lib/ld-linux-x86-64.so.2" ] || { echo "bundle_redis: ldd listed no ld-linux-x86-64.so.2" >&2; exit 1; }
cat > "$dest/bin/redis-server" <<'EOF'
#!/bin/sh
# The bundled redis-server (bench/bundle_redis.sh): its own loader and libraries, not the host's.
d=$(cd "$(dirname "$0")/.." && pwd)
exec "$d/lib/ld-linux-x86-64.so.2" --library-path "$d/lib" "$d/redis-server" "$@"
EOF
chmod +x "$dest/bin/redis-server" "$dest/redis-server" "$dest/lib/ld-linux-x86-64.so.2"
version=$("$dest/bin/redis-server" --version)
if [ "$xz" = 1 ]; then
  tar -C "$(dirname "$dest")" -cf - "$(basename "$dest")" | xz -T0 -9 > "$dest.tar.xz"
fi
echo "bundle_redis: $(ls "$dest/lib" | wc -l) libraries, $(du -sh "$dest" | cut -f1) in $dest$( [ "$xz" = 1 ] && echo ", $(du -h "$dest.tar.xz" | cut -f1) as $dest.tar.xz") ($version)"
