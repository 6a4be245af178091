#!/bin/sh
# Usage: scripts/with_progress.sh "what is running" COMMAND [ARGS...]
# Runs COMMAND and, while it runs, prints "[make] <what> ... (N s)" every 10 seconds, so a
# quiet step (pip install -q, a first compile) is never silent. Exits with COMMAND's status.
what=$1
shift
start=$(date +%s)
echo "[make] $what ..."
(
  while sleep 10; do
    echo "[make] $what ... ($(( $(date +%s) - start )) s)"
  done
) &
ticker=$!
"$@"
status=$?
kill "$ticker" 2>/dev/null
wait "$ticker" 2>/dev/null
exit $status
