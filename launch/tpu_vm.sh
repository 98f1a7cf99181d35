#!/usr/bin/env bash
# Run one jembed training on a Cloud TPU VM or pod slice: create it (or reuse it), install jembed
# with the `tpu` extra on every worker, start the same `python -m jembed.main ...` on all workers,
# stream worker 0's log until the run ends, and optionally delete the TPU afterwards.
#
#   bash launch/tpu_vm.sh --name my-v5e-16 --zone us-west4-a -- \
#       --config configs/mlm.py --workdir gs://bucket/run --config.model.size=base
#
# Everything after `--` goes to jembed.main unchanged (values with spaces survive the ssh hop).
# --dry-run prints every command, one per line (a runnable script), and runs none.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: bash launch/tpu_vm.sh --name NAME --zone ZONE [--accelerator-type v5litepod-16]
         [--version RUNTIME] [--project P] [--spot] [--create|--reuse] [--delete-after]
         [--repo URL [--branch B] | --local] [--dry-run] -- <jembed.main args>

  --name, --zone       the TPU VM (or pod slice) and its zone (required)
  --accelerator-type   default v5litepod-16 (4 hosts x 4 v5e chips)
  --version            TPU software version; default from the accelerator: v6e v2-alpha-tpuv6e,
                       v5p v2-alpha-tpuv5, v5e v2-alpha-tpuv5-lite, others tpu-ubuntu2204-base
  --project            Google Cloud project (default: gcloud's configured one)
  --spot               request Spot capacity through a queued resource (waits until ACTIVE)
  --create | --reuse   always create / require an existing TPU (default: create it if missing)
  --delete-after       delete the TPU when the run ends, whether it succeeded or failed
  --repo URL           install from a git URL on every worker (--branch picks a branch or tag)
  --local              copy this checkout (tracked and untracked, not ignored, files) with gcloud
                       scp (the default when --repo is not given)
  --dry-run            print the commands, one per line, and run none

The run is detached on the workers (nohup), logs to ~/jembed-run.log on each, and survives a lost
connection; re-attach with the `tail` command this script prints. Use a gs:// workdir when the TPU
is deleted afterwards. jembed.main gets --distributed=true unless you pass --distributed yourself.
EOF
}

die() { echo "tpu_vm.sh: error: $*" >&2; exit 2; }

# ---- arguments --------------------------------------------------------------------------------
NAME="" ZONE="" ACCEL="v5litepod-16" VERSION="" PROJECT="" SPOT=0 MODE="auto" DELETE_AFTER=0
REPO="" BRANCH="" LOCAL=0 DRY_RUN=0
while (($#)); do
  arg=$1
  if [[ $arg == --*=* && $arg != --=* ]]; then  # --flag=value -> --flag value
    shift; set -- "${arg%%=*}" "${arg#*=}" "$@"; arg=$1
  fi
  case $arg in
    --name|--zone|--accelerator-type|--version|--project|--repo|--branch)
      [[ $# -ge 2 && -n $2 && $2 != --* ]] || die "$arg needs a value (e.g. $arg VALUE)"
      case $arg in
        --name) NAME=$2;; --zone) ZONE=$2;; --accelerator-type) ACCEL=$2;; --version) VERSION=$2;;
        --project) PROJECT=$2;; --repo) REPO=$2;; --branch) BRANCH=$2;;
      esac
      shift 2;;
    --spot) SPOT=1; shift;;
    --create) MODE="create"; shift;;
    --reuse) MODE="reuse"; shift;;
    --delete-after) DELETE_AFTER=1; shift;;
    --local) LOCAL=1; shift;;
    --dry-run) DRY_RUN=1; shift;;
    -h|--help) usage; exit 0;;
    --) shift; break;;
    *) die "unknown option '$arg'; put jembed.main's arguments after '--' (see --help)";;
  esac
done
JEMBED_ARGS=("$@")

[[ -n $NAME ]] || die "--name is required: the TPU VM to create or reuse (e.g. --name my-v5e-16)"
[[ -n $ZONE ]] || die "--zone is required: the TPU's zone (e.g. --zone us-west4-a)"
[[ -n $REPO && $LOCAL == 1 ]] && die "--repo and --local exclude each other; choose one"
[[ -n $BRANCH && -z $REPO ]] && die "--branch needs --repo URL (--local copies this checkout as it is)"
[[ -z $REPO ]] && LOCAL=1
has_flag() {  # has_flag --x: jembed args contain "--x VALUE" or "--x=VALUE"
  local a; for a in "${JEMBED_ARGS[@]+"${JEMBED_ARGS[@]}"}"; do [[ $a == "$1" || $a == "$1"=* ]] && return 0; done
  return 1
}
((${#JEMBED_ARGS[@]})) || die "no jembed arguments: end with -- --config configs/mlm.py --workdir gs://BUCKET/run"
has_flag --config || die "no --config after '--': give the experiment (e.g. --config configs/mlm.py)"
has_flag --workdir || die "no --workdir after '--': give one every worker can reach (e.g. --workdir gs://BUCKET/run)"
has_flag --distributed || JEMBED_ARGS+=("--distributed=true")  # TPU VMs do not always set TPU_WORKER_HOSTNAMES
if [[ -z $VERSION ]]; then
  case $ACCEL in
    v6e-*) VERSION="v2-alpha-tpuv6e";;
    v5p-*) VERSION="v2-alpha-tpuv5";;
    v5litepod-*|v5e-*) VERSION="v2-alpha-tpuv5-lite";;
    *) VERSION="tpu-ubuntu2204-base";;
  esac
fi
if ((DELETE_AFTER)); then
  for ((i = 0; i < ${#JEMBED_ARGS[@]}; i++)); do
    a=${JEMBED_ARGS[i]}; w=""
    [[ $a == --workdir=* ]] && w=${a#--workdir=}
    [[ $a == --workdir ]] && w=${JEMBED_ARGS[i+1]-}
    if [[ -n $w && $w != gs://* ]]; then
      echo "tpu_vm.sh: warning: --delete-after deletes the workers' disks; --workdir $w is not gs://, so the run's outputs go with them" >&2
    fi
  done
fi

# ---- printing and running ----------------------------------------------------------------------
q() {  # one word, shell-quoted only when it needs to be
  if [[ -n $1 && $1 =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then printf '%s' "$1"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
qjoin() { local out="" w; for w in "$@"; do out+="${out:+ }$(q "$w")"; done; printf '%s' "$out"; }
run() {  # prints the command (stdout in a dry run, stderr with "+ " otherwise), then runs it
  if ((DRY_RUN)); then qjoin "$@"; echo; else echo "+ $(qjoin "$@")" >&2; "$@"; fi
}
run_sh() {  # the same for a shell line (pipes, ||)
  if ((DRY_RUN)); then echo "$1"; else echo "+ $1" >&2; bash -c "$1"; fi
}
retry() {  # run, retried: ssh/scp to a slice that has just come up can fail for a minute
  local i
  for i in 1 2 3; do
    run "$@" && return 0
    ((i < 3)) && { echo "tpu_vm.sh: attempt $i failed; retrying in 20 s" >&2; sleep 20; }
  done
  return 1
}

GCLOUD_OPTS=(--zone="$ZONE")
[[ -n $PROJECT ]] && GCLOUD_OPTS+=(--project="$PROJECT")
TPU=(gcloud compute tpus tpu-vm)
QR=(gcloud compute tpus queued-resources)
ssh_all() { "${2:-run}" "${TPU[@]}" ssh "$NAME" "${GCLOUD_OPTS[@]}" --worker=all --command="$1"; }

# ---- 1. the TPU --------------------------------------------------------------------------------
if ((SPOT)); then
  describe=("${QR[@]}" describe "$NAME" "${GCLOUD_OPTS[@]}")
  create=("${QR[@]}" create "$NAME" --node-id="$NAME" "${GCLOUD_OPTS[@]}" --accelerator-type="$ACCEL"
          --runtime-version="$VERSION" --spot)
  delete=("${QR[@]}" delete "$NAME" "${GCLOUD_OPTS[@]}" --force --quiet)
else
  describe=("${TPU[@]}" describe "$NAME" "${GCLOUD_OPTS[@]}")
  create=("${TPU[@]}" create "$NAME" "${GCLOUD_OPTS[@]}" --accelerator-type="$ACCEL" --version="$VERSION")
  delete=("${TPU[@]}" delete "$NAME" "${GCLOUD_OPTS[@]}" --quiet)
fi
case $MODE in
  create) run "${create[@]}";;
  reuse) run_sh "$(qjoin "${describe[@]}") >/dev/null || { echo 'tpu_vm.sh: error: TPU $NAME not found in $ZONE; drop --reuse to create it' >&2; exit 2; }";;
  auto) run_sh "$(qjoin "${describe[@]}") >/dev/null 2>&1 || $(qjoin "${create[@]}")";;
esac
if ((SPOT)); then  # a queued resource is granted asynchronously
  state_cmd=("${describe[@]}" --format="value(state.state)")
  if ((DRY_RUN)); then
    echo "$(qjoin "${state_cmd[@]}")  # repeated every 30 s until ACTIVE"
  else
    while :; do
      state=$("${state_cmd[@]}")
      case $state in
        ACTIVE) break;;
        FAILED|SUSPENDED) die "queued resource $NAME is $state; see: $(qjoin "${describe[@]}")";;
      esac
      echo "tpu_vm.sh: queued resource $NAME is ${state:-unknown}; waiting for ACTIVE" >&2
      sleep 30
    done
  fi
fi

# ---- 2. jembed on every worker ----------------------------------------------------------------
# Python >= 3.11 (the TPU images' Ubuntu 22.04 ships 3.10) in a venv outside the source tree, so a
# re-run replaces the source and keeps the installed packages.
INSTALL='PY=""; for p in python3.13 python3.12 python3.11; do if command -v $p >/dev/null; then PY=$p; break; fi; done'
INSTALL+='; if [ -z "$PY" ]; then sudo apt-get update -q && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o DPkg::Lock::Timeout=600 python3.11 python3.11-venv && PY=python3.11; fi'
INSTALL+='; set -e; [ -x ~/jembed-venv/bin/python ] || $PY -m venv ~/jembed-venv'
INSTALL+='; ~/jembed-venv/bin/pip install -q -U pip; ~/jembed-venv/bin/pip install -q -e ~/jembed"[tpu]"'
if ((LOCAL)); then
  ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  TARBALL="${TMPDIR:-/tmp}/jembed-$NAME.tar.gz"
  if git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1; then
    run_sh "git -C $(q "$ROOT") ls-files -z -co --exclude-standard | tar -czf $(q "$TARBALL") -C $(q "$ROOT") --ignore-failed-read --null -T -"
  else
    run_sh "tar -czf $(q "$TARBALL") -C $(q "$ROOT") --exclude=.venv --exclude=.git --exclude=workdirs ."
  fi
  retry "${TPU[@]}" scp "$TARBALL" "$NAME:jembed.tar.gz" "${GCLOUD_OPTS[@]}" --worker=all
  ssh_all "rm -rf ~/jembed && mkdir -p ~/jembed && tar -xzf ~/jembed.tar.gz -C ~/jembed; $INSTALL" retry
else
  clone="git clone -q --depth 1${BRANCH:+ --branch $(q "$BRANCH")} $(q "$REPO") ~/jembed"
  ssh_all "rm -rf ~/jembed && $clone; $INSTALL" retry
fi

# ---- 3. the run, on all workers at once ---------------------------------------------------------
# Detached so that it outlives this ssh session; the exit status lands in ~/jembed-run.rc. Not
# retried (a second start would race the first), and refused while an earlier run is still going.
START='if [ -f ~/jembed-run.pid ] && kill -0 "$(cat ~/jembed-run.pid)" 2>/dev/null; then echo "jembed: a run is still going on $(hostname) (pid $(cat ~/jembed-run.pid)); wait for it or kill it first" >&2; exit 1; fi; '
START+="cd ~/jembed && : > ~/jembed-run.log && rm -f ~/jembed-run.rc && { setsid nohup sh -c "
START+="'\"\$@\" >> ~/jembed-run.log 2>&1; echo \$? > ~/jembed-run.rc' jembed "
START+="~/jembed-venv/bin/python -m jembed.main $(qjoin "${JEMBED_ARGS[@]}")"
START+=' > /dev/null 2>&1 < /dev/null & echo $! > ~/jembed-run.pid; }'
ssh_all "$START"

# ---- 4. worker 0's log until the run ends; its exit status is ours ---------------------------------
# 254: the run ended without writing its status (killed); 255 is ssh's own failure (connection lost).
STREAM='tail -n +1 -f --pid="$(cat ~/jembed-run.pid)" ~/jembed-run.log; exit "$(cat ~/jembed-run.rc 2>/dev/null || echo 254)"'
stream=("${TPU[@]}" ssh "$NAME" "${GCLOUD_OPTS[@]}" --worker=0 --command="$STREAM")
rc=0
run "${stream[@]}" || rc=$?
if ((rc == 255)); then
  echo "tpu_vm.sh: lost the connection to worker 0; the run goes on (logs: ~/jembed-run.log on each" \
       "worker), so the TPU is kept. Re-attach: $(qjoin "${stream[@]}")" >&2
  exit "$rc"
fi
((DRY_RUN)) || echo "tpu_vm.sh: the run ended with status $rc (logs: ~/jembed-run.log on each worker)" >&2

# ---- 5. optional delete ---------------------------------------------------------------------------
if ((DELETE_AFTER)); then
  run "${delete[@]}"
fi
exit "$rc"
