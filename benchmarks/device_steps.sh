# Sourced by the device scripts (benchmarks/device_check*.sh): `step NAME SECONDS
# COMMAND...` runs COMMAND under a time limit, its output to $OUT/NAME.txt, and
# appends "NAME: exit RC, N s" to $summary, so that a failing step is recorded
# and the next one still runs.
step() {
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  echo "$name: exit $rc, $((SECONDS - start)) s" | tee -a "$summary"
}
