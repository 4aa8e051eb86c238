# shellcheck shell=bash
# Provisioning shared by scripts/test and scripts/bench (sourced, not run): makes sure the
# server binaries exist (installing Debian packages when missing), puts PostgreSQL's binaries on
# PATH, and builds (once, cached) kube-apiserver and the client-go elector, exporting
# LEASEHOLD_KUBE_APISERVER and LEASEHOLD_CLIENT_GO_ELECTOR.
#
# Expects: the repository root as the working directory, `quick` (true: install and build
# nothing, use what is cached), and the functions `step` and `warn`.

# Installs Debian packages that provide missing commands: apt_need CMD PACKAGE [CMD PACKAGE...]
apt_need() {
  local missing=()
  while [[ $# -gt 0 ]]; do
    command -v "$1" >/dev/null 2>&1 || missing+=("$2")
    shift 2
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  if $quick; then
    echo "scripts/test --quick provisions nothing, and these are missing: ${missing[*]}." >&2
    echo "Run scripts/test once (it installs them), or install them yourself." >&2
    exit 1
  fi
  step "installing Debian packages: ${missing[*]}"
  local sudo=""
  [[ $(id -u) -ne 0 ]] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
}
# Redis tests start their own redis-server processes (Debian package redis-server; redis-cli
# comes with it).
apt_need redis-server redis-server redis-cli redis-tools
# etcd tests start their own etcd (Debian etcd-server 3.4) and drive etcdctl (etcd-client).
# No protoc to install: the etcd-client crate's build gets scripts/protoc (.cargo/config.toml),
# which runs the protoc crates.io ships in protoc-bin-vendored, well-known types included.
apt_need etcd etcd-server etcdctl etcd-client
# Kubernetes tests start a real kube-apiserver (with its own etcd); it is built once with Go from
# the k8s.io/kubernetes module (tests/kube-apiserver) and cached (~8 min cold, instant after).
apt_need openssl openssl
# PostgreSQL tests start their own clusters with initdb + postgres (Debian package postgresql;
# its binaries live in /usr/lib/postgresql/<version>/bin, which is put on PATH). The TLS test's
# CA is made with openssl.
pg_bin() { compgen -G '/usr/lib/postgresql/*/bin/initdb' | sort -V | tail -n1 | xargs -r dirname; }
if ! command -v initdb >/dev/null 2>&1 && [[ -z "$(pg_bin)" ]]; then
  apt_need initdb postgresql
fi
if ! command -v initdb >/dev/null 2>&1; then
  [[ -n "$(pg_bin)" ]] || { echo "initdb not found after installing postgresql" >&2; exit 1; }
  PATH="$(pg_bin):$PATH"
  export PATH
fi
echo "using $(command -v initdb)"
# Under --quick only cached binaries are used (LEASEHOLD_CACHED_ONLY): nothing is built.
$quick && export LEASEHOLD_CACHED_ONLY=1
step "kube-apiserver (built once, cached)"
LEASEHOLD_KUBE_APISERVER=$(scripts/build-kube-apiserver | tail -n1)
export LEASEHOLD_KUBE_APISERVER
echo "using $LEASEHOLD_KUBE_APISERVER"
# The interop test runs client-go's own leaderelection (tests/client-go-elector), built once.
step "client-go elector (built once, cached)"
LEASEHOLD_CLIENT_GO_ELECTOR=$(scripts/build-client-go-elector | tail -n1)
export LEASEHOLD_CLIENT_GO_ELECTOR
echo "using $LEASEHOLD_CLIENT_GO_ELECTOR"

