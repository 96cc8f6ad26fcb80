#!/usr/bin/env bash
# The whole test suite (real-cluster tests skip themselves unless ES_URL / KIBANA_URL are set).
exec "$(dirname "$0")/dev.sh" python -m pytest "$@"
