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
exec "$(dirname "$0")/dev.sh" python -m pytest "$@"
