#!/usr/bin/env bash
# Installs spoold's system files: the /usr/bin/spoold link, the spoold user
# and /etc/spoold (systemd-sysusers, systemd-tmpfiles), the config (kept if
# there is one), the units and the docs. It starts nothing: review the config,
# then `systemctl enable --now spoold.socket spoold.service`.
#
# spoold itself must be installed first, in a virtualenv (default /opt/spoold):
#     python3 -m venv /opt/spoold && /opt/spoold/bin/pip install .
#
# usage: systemd/install.sh [--root DIR] [--venv DIR]
#   --root DIR  install into the tree DIR instead of / (a staged image, a
#               package build, the doc test); systemd is not asked to reload
#   --venv DIR  the virtualenv holding spoold, as seen from the installed
#               system (default /opt/spoold)
# Run from anywhere, as root; it reads the files beside it and in ../config, ../docs.
set -euo pipefail

root=/
venv=/opt/spoold
while [ $# -gt 0 ]; do
    case $1 in
        --root) root=${2:?--root needs a directory}; shift 2 ;;
        --root=*) root=${1#--root=}; shift ;;
        --venv) venv=${2:?--venv needs a directory}; shift 2 ;;
        --venv=*) venv=${1#--venv=}; shift ;;
        -h | --help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "install.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
case $venv in /*) ;; *) echo "install.sh: --venv must be an absolute path" >&2; exit 2 ;; esac
src=$(cd "$(dirname "$0")/.." && pwd)
root=$(cd "$root" && pwd)
r=${root%/}  # prefix for paths: "" for the live system
live=$([ "$root" = / ] && echo yes || echo no)
step() { echo "install.sh: $*"; }

# 1. spoold itself, and /usr/bin/spoold (the units' ExecStart) pointing at it.
if ! "$r$venv/bin/spoold" --version >/dev/null; then
    echo "install.sh: $r$venv/bin/spoold does not run; install spoold there first:" >&2
    echo "    python3 -m venv $venv && $venv/bin/pip install $src" >&2
    exit 1
fi
step "$("$r$venv/bin/spoold" --version) in $venv"
install -d -m 0755 "$r/usr/bin"
ln -sfn "../..$venv/bin/spoold" "$r/usr/bin/spoold"  # relative: right inside a staged tree too
step "/usr/bin/spoold -> $venv/bin/spoold"

# 2. The user, and /etc/spoold (StateDirectory= and RuntimeDirectory= of the
#    unit make /var/lib/spoold and /run/spoold when the service starts).
install -D -m 0644 "$src/systemd/spoold.sysusers.conf" "$r/etc/sysusers.d/spoold.conf"
install -D -m 0644 "$src/systemd/spoold.tmpfiles.conf" "$r/etc/tmpfiles.d/spoold.conf"
systemd-sysusers --root="$root" spoold.conf
systemd-tmpfiles --root="$root" --create spoold.conf
gid=$(awk -F: '$1 == "spoold" { print $3 }' "$r/etc/group")
step "user spoold, group spoold ($gid), /etc/spoold"

# 3. The config: root owns it, the daemon (group spoold) reads it.
if [ -e "$r/etc/spoold/spoold.toml" ]; then
    step "kept /etc/spoold/spoold.toml (compare it with $src/config/production.toml)"
else
    install -m 0640 -o 0 -g "$gid" "$src/config/production.toml" "$r/etc/spoold/spoold.toml"
    step "/etc/spoold/spoold.toml from config/production.toml: set routes.smarthost before starting"
fi

# 4. The units, checked before systemd sees them.
install -D -m 0644 "$src/systemd/spoold.service" "$r/etc/systemd/system/spoold.service"
install -D -m 0644 "$src/systemd/spoold.socket" "$r/etc/systemd/system/spoold.socket"
check=$(mktemp -d)
trap 'rm -rf "$check"' EXIT
# verify resolves ExecStart on this machine: point a copy at the staged binary.
sed "s|^ExecStart=/usr/bin/spoold|ExecStart=$r/usr/bin/spoold|" \
    "$src/systemd/spoold.service" > "$check/spoold.service"
cp "$src/systemd/spoold.socket" "$check/spoold.socket"
problems=$(systemd-analyze verify --man=no "$check/spoold.service" "$check/spoold.socket" 2>&1 || true)
if [ -n "$problems" ]; then
    echo "install.sh: systemd-analyze verify found problems in the units:" >&2
    echo "$problems" >&2
    exit 1
fi
step "/etc/systemd/system/spoold.service and spoold.socket (verified)"

# 5. The docs, where the units' Documentation= points.
install -d -m 0755 "$r/usr/share/doc/spoold"
install -m 0644 "$src"/docs/*.md "$r/usr/share/doc/spoold/"
step "/usr/share/doc/spoold/"

if [ "$live" = yes ]; then
    systemctl daemon-reload
    step "systemd reloaded; next: review /etc/spoold/spoold.toml, then"
    step "    systemctl enable --now spoold.socket spoold.service"
fi
