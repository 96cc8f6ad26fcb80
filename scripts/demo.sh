#!/usr/bin/env bash
# The main job on the embedded default: simulator on loopback, one realistic day collected.
exec "$(dirname "$0")/dev.sh" openai-input demo "$@"
