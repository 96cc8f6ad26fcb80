#!/usr/bin/env bash
# The whole test suite (real-cluster tests skip themselves unless ES_URL / KIBANA_URL are set).
#
# Temporary files (every test's state store, outbox and output files) go to /dev/shm where it is
# a writable tmpfs with room (2 GiB free; the suite writes a few hundred MB): the state store
# commits with synchronous=FULL, and on a disk those fsyncs were most of the time of the store-heavy
# tests (the width-change property test 28 s, 12 s on tmpfs) while buying a test nothing: what a
# killed process wrote survives it either way, and the tests of fsync order patch os.fsync. A
# TMPDIR set by the caller is kept.
if [ -z "${TMPDIR:-}" ] && [ -d /dev/shm ] && [ -w /dev/shm ] \
        && [ "$(df -Pk /dev/shm 2>/dev/null | awk 'NR == 2 {print $4}')" -ge 2097152 ] 2>/dev/null; then
    export TMPDIR=/dev/shm
fi
# The tests run in one worker process per CPU (pytest-xdist), at most 4; on one CPU in this
# process (-n 0). Much of the suite waits on the collector processes it starts, not the CPU: on
# 2 CPUs -n 2 took 6-7 minutes where one process took 11 under the same load. An -n passed to
# this script comes after this one and wins; with `-p no:xdist` none is passed (pytest would
# refuse the -n it no longer knows).
cpus="$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)"
workers=$(( cpus > 4 ? 4 : cpus ))
[ "$workers" -gt 1 ] || workers=0
previous=""
for arg in "$@"; do
    case "$previous $arg" in
        "-p no:xdist" | *" -pno:xdist")
            exec "$(dirname "$0")/dev.sh" python -m pytest "$@" ;;
    esac
    previous="$arg"
done
exec "$(dirname "$0")/dev.sh" python -m pytest -n "$workers" "$@"
