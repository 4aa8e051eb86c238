#!/usr/bin/env bash
# Smoke test of client-go-elector against a real kube-apiserver (not part of CI):
# starts etcd + the cached kube-apiserver on free loopback ports, runs two electors on one
# Lease, SIGTERMs the leader and checks that the other takes over and the Lease changed
# hands. Needs /usr/bin/etcd (Debian's etcd-server), openssl, curl, jq, python3.
#
#   tests/client-go-elector/verify.sh            # builds both binaries if needed (cached)
#   KEEP=1 tests/client-go-elector/verify.sh     # keep the temp dir for inspection
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
fail() { echo "verify: FAIL: $*" >&2; exit 1; }

apiserver=$("$root/scripts/build-kube-apiserver" | tail -n1)
elector=$("$root/scripts/build-client-go-elector" | tail -n1)

D=$(mktemp -d /tmp/client-go-elector-verify.XXXXXX)
pids=() # started in this order: etcd, kube-apiserver, electors
# Stop one process: SIGTERM, then SIGKILL after $2 seconds.
stop() {
  kill -TERM "$1" 2>/dev/null || return 0
  for _ in $(seq 1 $(($2 * 10))); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}
cleanup() {
  # In reverse order: a kube-apiserver whose etcd is already gone hangs on SIGTERM.
  local i
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do stop "${pids[i]}" 10; done
  if [[ ${KEEP:-} == 1 ]]; then echo "verify: kept $D" >&2; else rm -rf "$D"; fi
}
trap cleanup EXIT

read -r C P S < <(python3 -c '
import socket
ss = [socket.socket() for _ in range(3)]
for s in ss: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in ss])')
mkdir -p "$D/etcd" "$D/certs"
openssl genrsa -out "$D/sa.key" 2048 2>/dev/null
echo 'admin-token,admin,uid-admin,"system:masters"' >"$D/tokens.csv"

etcd --data-dir "$D/etcd" --listen-client-urls "http://127.0.0.1:$C" \
  --advertise-client-urls "http://127.0.0.1:$C" --listen-peer-urls "http://127.0.0.1:$P" \
  >"$D/etcd.log" 2>&1 &
pids+=($!)
"$apiserver" --etcd-servers="http://127.0.0.1:$C" --bind-address=127.0.0.1 --secure-port="$S" \
  --cert-dir="$D/certs" --service-cluster-ip-range=10.0.0.0/24 --allow-privileged=true \
  --authorization-mode=RBAC --token-auth-file="$D/tokens.csv" \
  --service-account-issuer="https://127.0.0.1:$S" \
  --service-account-key-file="$D/sa.key" --service-account-signing-key-file="$D/sa.key" \
  --disable-admission-plugins=ServiceAccount \
  --advertise-address=127.0.0.1 --endpoint-reconciler-type=none >"$D/apiserver.log" 2>&1 &
pids+=($!)

api() { curl -sS --cacert "$D/certs/apiserver.crt" -H 'Authorization: Bearer admin-token' "$@"; }
for _ in $(seq 1 120); do
  [[ $(api -o /dev/null -w '%{http_code}' "https://127.0.0.1:$S/readyz" 2>/dev/null) == 200 ]] && break
  sleep 0.5
done
[[ $(api -o /dev/null -w '%{http_code}' "https://127.0.0.1:$S/readyz") == 200 ]] \
  || fail "kube-apiserver not ready; see $D/apiserver.log (KEEP=1)"

cat >"$D/kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters:
- name: test
  cluster:
    server: https://127.0.0.1:$S
    certificate-authority: $D/certs/apiserver.crt
users:
- name: admin
  user:
    token: admin-token
contexts:
- name: test
  context:
    cluster: test
    user: admin
current-context: test
KC

lease_url="https://127.0.0.1:$S/apis/coordination.k8s.io/v1/namespaces/default/leases/verify"
args=(--kubeconfig "$D/kubeconfig" --name verify --lease-duration 2s --renew-deadline 1500ms --retry-period 300ms)
declare -A pid
for id in alpha beta; do
  "$elector" "${args[@]}" --identity "$id" >"$D/$id.out" 2>"$D/$id.err" &
  pid[$id]=$!; pids+=($!)
done

# Exactly one leader, and both saw it.
leader=
for _ in $(seq 1 50); do
  leader=$(jq -r 'select(.event == "started") | .identity' "$D/alpha.out" "$D/beta.out")
  [[ -n $leader ]] && break
  sleep 0.1
done
sleep 1
[[ $(jq -r 'select(.event == "started") | .identity' "$D/alpha.out" "$D/beta.out" | wc -l) == 1 ]] \
  || fail "expected exactly one 'started'"
for id in alpha beta; do
  # (jq -s + any: jq 1.6's -e exits 4 when a later input yields no output)
  jq -se --arg l "$leader" 'any(.[]; .event == "new_leader" and .leader == $l)' "$D/$id.out" >/dev/null \
    || fail "$id did not report new_leader $leader"
done
[[ $(api "$lease_url" | jq -r .spec.holderIdentity) == "$leader" ]] || fail "Lease holder is not $leader"
other=alpha; [[ $leader == alpha ]] && other=beta
echo "verify: $leader leads, $other follows" >&2

# SIGTERM the leader: it releases and exits 0; the other takes over within ~a retry period.
t0=$(date +%s%N)
kill -TERM "${pid[$leader]}"
rc=0; wait "${pid[$leader]}" || rc=$?
[[ $rc == 0 ]] || fail "$leader exited $rc after SIGTERM"
jq -se 'any(.[]; .event == "exit")' "$D/$leader.out" >/dev/null || fail "$leader printed no exit event"
t1=
for _ in $(seq 1 50); do
  t1=$(jq -r 'select(.event == "started") | .at_unix_nano' "$D/$other.out")
  [[ -n $t1 ]] && break
  sleep 0.1
done
[[ -n $t1 ]] || fail "$other did not start leading within 5s"
[[ $(api "$lease_url" | jq -r .spec.holderIdentity) == "$other" ]] || fail "Lease holder is not $other"
echo "verify: $other took over $(( (t1 - t0) / 1000000 )) ms after SIGTERM to $leader" >&2

kill -TERM "${pid[$other]}"
rc=0; wait "${pid[$other]}" || rc=$?
[[ $rc == 0 ]] || fail "$other exited $rc after SIGTERM"
[[ $(api "$lease_url" | jq -r .spec.holderIdentity) == "" ]] || fail "Lease not released by $other"
echo "verify: OK" >&2
