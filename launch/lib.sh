# Shared helpers of the launch scripts (sourced; needs PROG set).
# slurm.sbatch keeps its own copy: SLURM runs a spooled copy of it, away from this folder.

die() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  exit 2
}

# Quote one word for a POSIX shell; leave simple words unquoted.
q() {
  local s=$1
  if [[ -n $s && $s =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

# Quote every argument and join them with spaces.
qjoin() {
  local out="" a
  for a in "$@"; do
    out+="${out:+ }$(q "$a")"
  done
  printf '%s' "$out"
}
