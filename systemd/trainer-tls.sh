#!/bin/sh
# A private CA and the trainer's TLS certificate signed by it (OpenSSL, P-256), for a trainer that
# the nodes reach over the network. Files that exist are kept (run it again after deleting
# trainer.crt to renew the certificate under the same CA); beside an existing trainer.crt (one's
# own CA's, say) it creates nothing, not even a CA that did not sign it.
#
#   systemd/trainer-tls.sh DIR SUBJECT_ALT_NAMES
#   sudo systemd/trainer-tls.sh /etc/faasrm/tls "DNS:trainer.example.org,IP:10.0.0.5"
#
# DIR/ca.crt       the CA: copy it to every node ([shipper] ca_file; faasrm trainer publish --ca-file)
# DIR/ca.key       the CA's key: stays here, readable by root only
# DIR/trainer.crt  the trainer's certificate (tls_cert_file), valid for SUBJECT_ALT_NAMES: the
#                  names and addresses in the nodes' shipper url
# DIR/trainer.key  its key (tls_key_file); the unit hands both to the trainer as credentials
set -eu

if [ $# -ne 2 ]; then
    sed -n '2,14p' "$0" >&2
    exit 2
fi
DIR=$1
SAN=$2
command -v openssl >/dev/null || { echo "trainer-tls.sh: openssl is needed" >&2; exit 1; }
umask 077
mkdir -p "$DIR"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
quiet() {  # openssl chatters on stderr: show it only when it fails
    "$@" 2>"$tmp/err" || { cat "$tmp/err" >&2; exit 1; }
}

if [ -e "$DIR/trainer.crt" ]; then
    echo "kept $DIR/trainer.crt (delete it to renew it)"
    exit 0
fi
if [ ! -e "$DIR/ca.crt" ]; then
    quiet openssl req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 \
        -days 3650 -subj "/CN=faasrm trainer CA" -keyout "$DIR/ca.key" -out "$DIR/ca.crt" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign"
    chmod 0644 "$DIR/ca.crt"
    echo "created the CA $DIR/ca.crt (copy it to every node)"
fi
printf '%s\n' "subjectAltName=$SAN" "basicConstraints=critical,CA:FALSE" \
    "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth" > "$tmp/ext"
quiet openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 \
    -subj "/CN=faasrm trainer" -keyout "$DIR/trainer.key" -out "$tmp/csr"
quiet openssl x509 -req -in "$tmp/csr" -CA "$DIR/ca.crt" -CAkey "$DIR/ca.key" -days 825 \
    -set_serial "0x$(openssl rand -hex 16)" -extfile "$tmp/ext" -out "$DIR/trainer.crt"
chmod 0644 "$DIR/trainer.crt"
echo "created $DIR/trainer.crt for $SAN"
