#!/bin/sh
# Install faasrm on a host: a venv under /opt/faasrm, the systemd unit(s), example configs, and
# the monitoring assets (Grafana dashboard, Prometheus alert rules) in <prefix>/share/faasrm.
# Units are installed and systemd reloaded, but nothing is started unless --start is given.
#
#   sudo systemd/install.sh --role sidecar            # an invoker host
#   sudo systemd/install.sh --role trainer --start    # the trainer host
#
# Options: --role sidecar|trainer|both (default sidecar), --prefix DIR (default /opt/faasrm),
#          --start (enable --now the unit(s)), --skip-venv (units and configs only),
#          --tls-names SAN (the trainer's certificate names, default "DNS:<fqdn>,DNS:<hostname>").
# DESTDIR=/some/root installs into a staging tree (no systemctl calls then).
# A trainer also gets a private CA and a TLS pair in /etc/faasrm/tls (systemd/trainer-tls.sh;
# existing files are kept): copy /etc/faasrm/tls/ca.crt to the nodes ([shipper] ca_file), and a
# bearer token in /etc/faasrm/trainer.env (0600, kept): put it in each node's sidecar.env.
set -eu

ROLE=sidecar
PREFIX=/opt/faasrm
START=no
SKIP_VENV=no
TLS_NAMES=""
SRC=$(cd "$(dirname "$0")/.." && pwd)
DESTDIR=${DESTDIR:-}
PYTHON=${PYTHON:-python3}

while [ $# -gt 0 ]; do
    case "$1" in
        --role) ROLE=$2; shift 2 ;;
        --prefix) PREFIX=$2; shift 2 ;;
        --start) START=yes; shift ;;
        --skip-venv) SKIP_VENV=yes; shift ;;
        --tls-names) TLS_NAMES=$2; shift 2 ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
case "$ROLE" in
    sidecar) UNITS=faasrm-sidecar; EXTRA="" ;;
    trainer) UNITS=faasrm-trainer; EXTRA="[train]" ;;
    both) UNITS="faasrm-sidecar faasrm-trainer"; EXTRA="[train]" ;;
    *) echo "install.sh: --role must be sidecar, trainer or both" >&2; exit 2 ;;
esac

if [ "$SKIP_VENV" = no ]; then
    echo "creating the venv in $DESTDIR$PREFIX/venv"
    "$PYTHON" -m venv "$DESTDIR$PREFIX/venv"
    "$DESTDIR$PREFIX/venv/bin/pip" install --upgrade pip >/dev/null
    # the trainer pulls torch: the pinned CPU wheel (an unpinned torch is a multi-GB CUDA build)
    "$DESTDIR$PREFIX/venv/bin/pip" install "$SRC$EXTRA"
fi

install -d -m 0755 "$DESTDIR/etc/faasrm" "$DESTDIR/etc/systemd/system"
# the group that may call the sidecar's hooks on /run/faasrm/sidecar.sock ([server] socket_group)
if [ -z "$DESTDIR" ] && [ "$ROLE" != trainer ] && ! getent group faasrm >/dev/null; then
    groupadd --system faasrm
    echo "created the group faasrm (set [server] socket_group = \"faasrm\"; add the invoker to it)"
fi
install -d -m 0750 "$DESTDIR/var/lib/faasrm"
for unit in $UNITS; do
    sed "s#/opt/faasrm/venv/bin/faasrm#$PREFIX/venv/bin/faasrm#" "$SRC/systemd/$unit.service" \
        > "$DESTDIR/etc/systemd/system/$unit.service"
    chmod 0644 "$DESTDIR/etc/systemd/system/$unit.service"
    echo "installed $unit.service"
done
# example configs (no secrets in them: tokens go to /etc/faasrm/*.env), never overwritten
copy_config() {
    if [ ! -e "$DESTDIR/etc/faasrm/$2" ]; then
        install -m 0644 "$SRC/$1" "$DESTDIR/etc/faasrm/$2"
        echo "installed /etc/faasrm/$2 (edit it: grid, containers, trainer url)"
    fi
}
case "$ROLE" in
    sidecar) copy_config sidecar/example.toml sidecar.toml ;;
    trainer) copy_config training/trainer.example.toml trainer.toml ;;
    both) copy_config sidecar/example.toml sidecar.toml
          copy_config training/trainer.example.toml trainer.toml ;;
esac
# the trainer's bearer token, in the units' EnvironmentFile: root's alone (0600) whatever the
# caller's umask, written once (a re-run keeps it). A trainer gets a fresh one (it refuses to start
# without); an invoker host's file waits for the trainer's (sudoedit keeps the mode).
write_env() {
    if [ ! -e "$DESTDIR/etc/faasrm/$1" ]; then
        (umask 077 && printf '%s\n' "$2" > "$DESTDIR/etc/faasrm/$1")
        echo "wrote /etc/faasrm/$1 (root only)"
    fi
}
case "$ROLE" in
    trainer|both)
        token=$(od -An -tx1 -N24 /dev/urandom | tr -d ' \n')
        write_env trainer.env "FAASRM_TRAINER_TOKEN=$token" ;;
esac
case "$ROLE" in
    both) write_env sidecar.env "$(grep '^FAASRM_TRAINER_TOKEN=' "$DESTDIR/etc/faasrm/trainer.env")" ;;
    sidecar) write_env sidecar.env "# FAASRM_TRAINER_TOKEN=<the token in the trainer's trainer.env>" ;;
esac
# the trainer's TLS pair (its example config listens on every interface, over https only)
case "$ROLE" in
    trainer|both)
        if [ -z "$TLS_NAMES" ]; then
            fqdn=$(hostname -f 2>/dev/null || hostname)
            TLS_NAMES="DNS:$fqdn"
            [ "$(hostname)" = "$fqdn" ] || TLS_NAMES="$TLS_NAMES,DNS:$(hostname)"
        fi
        if command -v openssl >/dev/null; then
            sh "$SRC/systemd/trainer-tls.sh" "$DESTDIR/etc/faasrm/tls" "$TLS_NAMES"
        else
            echo "no openssl here: put the trainer's TLS pair in /etc/faasrm/tls yourself" \
                "(systemd/trainer-tls.sh on another machine) before starting it"
        fi ;;
esac

# monitoring: the Grafana dashboard and the Prometheus alert rules with their unit tests
install -d -m 0755 "$DESTDIR$PREFIX/share/faasrm"
for f in grafana-dashboard.json alerts.yml alerts_test.yml; do
    install -m 0644 "$SRC/systemd/monitoring/$f" "$DESTDIR$PREFIX/share/faasrm/$f"
done
echo "installed $PREFIX/share/faasrm/{grafana-dashboard.json,alerts.yml} (docs/operations.md)"

if [ -z "$DESTDIR" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    if [ "$START" = yes ]; then
        for unit in $UNITS; do systemctl enable --now "$unit.service"; done
    else
        echo "not started; run: systemctl enable --now $UNITS"
    fi
else
    echo "systemd is not running here (or DESTDIR is set): units copied, nothing reloaded"
fi
