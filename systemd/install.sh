#!/usr/bin/env bash
# Installs spoold's system files: the /usr/bin/spoold link, the spoold user
# and /etc/spoold (systemd-sysusers, systemd-tmpfiles), the config (kept if
# there is one), the units and the docs. It starts nothing: review the config,
# then `systemctl enable --now spoold.socket spoold.service`.
#
# spoold itself must be installed first, in a virtualenv (default /opt/spoold):
#     python3 -m venv /opt/spoold && /opt/spoold/bin/pip install .
#
# usage: systemd/install.sh [--root DIR] [--venv DIR] [--sendmail | --check-sendmail]
#   --root DIR  install into the tree DIR instead of / (a staged image, a
#               package build, the doc test); systemd is not asked to reload
#   --venv DIR  the virtualenv holding spoold, as seen from the installed
#               system (default /opt/spoold)
#   --sendmail  also make spoold the machine's sendmail: /usr/sbin/sendmail,
#               /usr/lib/sendmail and /usr/bin/mailq (update-alternatives
#               where there is one); refused while another MTA's package
#               owns them or (on this machine) something else listens on 25
#   --check-sendmail  only say whether --sendmail could go ahead (exit 0) or
#               not (exit 1, and why); changes nothing
# Run from anywhere, as root; it reads the files beside it and in ../config, ../docs.
set -euo pipefail

root=/
venv=/opt/spoold
sendmail=no
while [ $# -gt 0 ]; do
    case $1 in
        --root) root=${2:?--root needs a directory}; shift 2 ;;
        --root=*) root=${1#--root=}; shift ;;
        --venv) venv=${2:?--venv needs a directory}; shift 2 ;;
        --venv=*) venv=${1#--venv=}; shift ;;
        --sendmail) sendmail=yes; shift ;;
        --check-sendmail) sendmail=check; shift ;;
        -h | --help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "install.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
case $venv in /*) ;; *) echo "install.sh: --venv must be an absolute path" >&2; exit 2 ;; esac
src=$(cd "$(dirname "$0")/.." && pwd)
root=$(cd "$root" && pwd)
r=${root%/}  # prefix for paths: "" for the live system
live=$([ "$root" = / ] && echo yes || echo no)
step() { echo "install.sh: $*"; }
say() { echo "install.sh: $*" >&2; }

# The paths a sendmail-compatible MTA provides on Debian (and most systems).
mta_paths="/usr/sbin/sendmail /usr/lib/sendmail /usr/bin/mailq"

# Where the link chain at $1 ends, inside the root (an absolute link such as
# /etc/alternatives/sendmail is read in the root, not on this machine).
resolve_in_root() {
    local path=$1 hops=0 next
    while [ -L "$r$path" ] && [ $hops -lt 10 ]; do
        next=$(readlink "$r$path")
        case $next in /*) path=$next ;; *) path=$(dirname "$path")/$next ;; esac
        hops=$((hops + 1))
    done
    echo "$path"
}

# Whether spoold may become the machine's sendmail; if not, says why and
# what to do, and returns 1. Reads only.
sendmail_check() {
    local ok=0 path owner target
    if command -v dpkg-query >/dev/null 2>&1 && [ -d "$r/var/lib/dpkg/info" ]; then
        for path in $mta_paths; do
            owner=$(dpkg-query --admindir="$r/var/lib/dpkg" -S "$path" 2>/dev/null \
                | sed -n "s|^\([^:]*\): $path\$|\1|p" | head -n 1) || true
            if [ -n "$owner" ]; then
                say "$path belongs to the package $owner, another mail transport agent;"
                say "    spoold will not take its place while it is installed. If spoold is"
                say "    to be this machine's MTA, let that one empty its queue (mailq), then"
                say "    remove it (apt-get remove $owner) and run install.sh --sendmail again."
                ok=1
                break
            fi
        done
    fi
    if [ "$ok" = 0 ]; then
        for path in $mta_paths; do
            if [ -e "$r$path" ] || [ -L "$r$path" ]; then
                target=$(resolve_in_root "$path")
                case $target in
                    */spoold-sendmail) ;;  # ours, from an earlier run
                    *)
                        say "$path is already there ($target) and is not spoold's;"
                        say "    move it away, or remove the mail software it belongs to, first."
                        ok=1 ;;
                esac
            fi
        done
    fi
    if [ "$live" = yes ]; then
        # Something on port 25 that is not spoold's own socket unit: another MTA runs.
        if [ -n "$(awk 'NR > 1 && $4 == "0A" && $2 ~ /:0019$/' /proc/net/tcp /proc/net/tcp6 2>/dev/null)" ] \
                && ! { command -v systemctl >/dev/null 2>&1 \
                       && systemctl is-active --quiet spoold.socket 2>/dev/null; }; then
            say "something already listens on port 25 (another MTA?):"
            if command -v ss >/dev/null 2>&1; then
                ss -Hltnp 'sport = :25' 2>/dev/null | sed 's/^/install.sh:     /' >&2 || true
            fi
            say "    stop and remove it (e.g. systemctl disable --now postfix; apt-get remove"
            say "    postfix), then run install.sh --sendmail again."
            ok=1
        fi
    fi
    return $ok
}

if [ "$sendmail" = check ]; then
    if sendmail_check; then
        step "spoold can be this machine's sendmail (run install.sh --sendmail)"
        exit 0
    fi
    exit 1
fi
if [ "$sendmail" = yes ] && ! sendmail_check; then
    say "nothing was installed"
    exit 1
fi

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

# 6. (--sendmail) spoold as the machine's sendmail and mailq.
if [ "$sendmail" = yes ]; then
    entry="$venv/bin/spoold-sendmail"
    if [ ! -x "$r$entry" ]; then
        say "$r$entry is missing: install this version of spoold into $venv first"
        exit 1
    fi
    install -d -m 0755 "$r/usr/sbin" "$r/usr/lib" "$r/usr/bin"
    if command -v update-alternatives >/dev/null 2>&1; then
        # Debian's own MTAs ship these files and conflict with one another;
        # an alternative keeps spoold's removable in one command.
        update-alternatives --quiet --root "$root" \
            --install /usr/sbin/sendmail sendmail "$entry" 25 \
            --slave /usr/lib/sendmail lib.sendmail "$entry" \
            --slave /usr/bin/mailq mailq "$entry"
        step "/usr/sbin/sendmail, /usr/lib/sendmail, /usr/bin/mailq -> $entry (alternative 'sendmail';"
        step "    to undo: update-alternatives --remove sendmail $entry)"
    else
        ln -sfn "../..$entry" "$r/usr/sbin/sendmail"
        ln -sfn "../..$entry" "$r/usr/lib/sendmail"
        ln -sfn "../..$entry" "$r/usr/bin/mailq"
        step "/usr/sbin/sendmail, /usr/lib/sendmail, /usr/bin/mailq -> $entry"
    fi
fi

if [ "$live" = yes ]; then
    systemctl daemon-reload
    step "systemd reloaded; next: review /etc/spoold/spoold.toml, then"
    step "    systemctl enable --now spoold.socket spoold.service"
fi
