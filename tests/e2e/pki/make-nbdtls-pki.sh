#!/bin/bash
# Regenerates tests/e2e/pki/nbdtls/: the test PKI of tests/e2e/test_datapath_nbdtls.py.
# The test VM has no openssl (nor certtool, nor python3-cryptography), so these
# test-only certificates are made here once, valid for 100 years:
#   ca/            the pool CA: node/{cert,key,ca}.pem (SAN IP:10.81.0.1), and the
#                  client directories h1/ h2/ (ca-cert.pem, client-cert.pem,
#                  client-key.pem, as nbdtls.py, libnbd and qemu want them)
#   forged/        a client directory with CN=h2 signed by another CA
set -euo pipefail
cd "$(dirname "$0")"
out=nbdtls
rm -rf "$out" && mkdir -p "$out"/{node,h1,h2,forged} && tmp=$(mktemp -d) && trap 'rm -rf "$tmp"' EXIT
ca() {  # dir subject
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$1/ca-key.pem" \
        -out "$1/ca-cert.pem" -days 36500 -subj "$2" \
        -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
}
leaf() {  # cadir key cert subject usage [san]
    printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=%s\n' "$5" > "$tmp/ext"
    [ -z "${6:-}" ] || echo "subjectAltName=$6" >> "$tmp/ext"
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$2" -out "$tmp/csr" -subj "$4" 2>/dev/null
    openssl x509 -req -in "$tmp/csr" -CA "$1/ca-cert.pem" -CAkey "$1/ca-key.pem" -CAcreateserial \
        -out "$3" -days 36500 -extfile "$tmp/ext" 2>/dev/null
}
mkdir -p "$tmp/ca" "$tmp/other"
ca "$tmp/ca" "/CN=zfs-ng test pool CA"
ca "$tmp/other" "/CN=another CA"
leaf "$tmp/ca" "$out/node/key.pem" "$out/node/cert.pem" "/CN=node" serverAuth "IP:10.81.0.1,DNS:node"
cp "$tmp/ca/ca-cert.pem" "$out/node/ca.pem"
for h in h1 h2; do
    leaf "$tmp/ca" "$out/$h/client-key.pem" "$out/$h/client-cert.pem" "/O=zfs-ng test/CN=$h" clientAuth
    cp "$tmp/ca/ca-cert.pem" "$out/$h/ca-cert.pem"
done
leaf "$tmp/other" "$out/forged/client-key.pem" "$out/forged/client-cert.pem" "/O=zfs-ng test/CN=h2" clientAuth
cp "$tmp/ca/ca-cert.pem" "$out/forged/ca-cert.pem"
chmod 0600 "$out"/*/*key.pem
echo "$out: $(find "$out" -type f | wc -l) files"
