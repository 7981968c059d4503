# Shared helpers of the launch scripts (sourced; needs PROG set, and usage() for
# parse_options).
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

# The option loop every launcher shares. Call it as
#   parse_options "VALUED OPTIONS" "FLAG OPTIONS" "$@"
# with the option names space-separated (aliases included). Valued options take
# '--opt VALUE' or '--opt=VALUE'; flags refuse '--flag=VALUE'; -h/--help calls the
# script's usage() and exits 0; '--' ends the options and the rest go to MAIN_ARGS.
# Each option calls the script's on_option OPT VALUE (VALUE empty for a flag), each other
# word on_positional WORD (by default an error: mixer_jax.main's flags go after '--').
parse_options() {
  local valued flags arg opt val inline
  read -ra valued <<<"$1"
  read -ra flags <<<"$2 -h --help"
  shift 2
  MAIN_ARGS=()
  while (($#)); do
    arg=$1
    shift
    if [[ $arg == --*=* ]]; then
      opt=${arg%%=*} val=${arg#*=} inline=1
    else
      opt=$arg val="" inline=0
    fi
    case $opt in
      --) MAIN_ARGS=("$@"); return 0 ;;
    esac
    if _one_of "$opt" "${valued[@]}"; then
      if ((!inline)); then
        (($#)) || die "option $opt needs a value"
        val=$1
        shift
      fi
    elif _one_of "$opt" "${flags[@]}"; then
      ((!inline)) || die "option $opt takes no value"
      case $opt in -h | --help) usage; exit 0 ;; esac
    elif [[ $opt == -* ]]; then
      die "unknown option '$arg' (try --help)"
    else
      on_positional "$arg"
      continue
    fi
    on_option "$opt" "$val"
  done
}

_one_of() { # _one_of WORD CHOICES...
  local word=$1 choice
  shift
  for choice in "$@"; do
    [[ $word == "$choice" ]] && return 0
  done
  return 1
}

on_positional() {
  die "unexpected argument '$1'; pass mixer_jax.main flags after '--' (try --help)"
}

# refuse_process_flags REASON ARGS...: the process layout is the launcher's to set.
refuse_process_flags() {
  local reason=$1 a
  shift
  for a in "$@"; do
    case $a in
      --coordinator_address* | --num_processes* | --process_id*)
        die "don't pass $a$reason" ;;
    esac
  done
}
