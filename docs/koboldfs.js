// KoboldFS signed URLs, checked in nginx with njs (Debian:
// libnginx-mod-http-js): the HMAC-SHA256 signature the built-in server
// checks, instead of the MD5 token of nginx's secure_link.  Used by
// docs/nginx-hmac.conf; see docs/http.md.
//
// A URL carries e (expiry, seconds since the epoch) and
// s = base64url(HMAC-SHA256(secret, e + uri)); the namespace's secret
// comes from $kobold_secret.  signed() gives "1" for a valid, unexpired
// signature, "" otherwise.

const crypto = require('crypto');

function equal(a, b) {
    // In time independent of where the strings differ.
    if (a.length !== b.length) {
        return false;
    }
    let diff = 0;
    for (let i = 0; i < a.length; i++) {
        diff |= a.charCodeAt(i) ^ b.charCodeAt(i);
    }
    return diff === 0;
}

function signed(r) {
    const secret = r.variables.kobold_secret;
    const e = r.args.e;
    const s = r.args.s;
    if (!secret || typeof e !== 'string' || typeof s !== 'string' || !/^[0-9]{1,12}$/.test(e)) {
        return '';
    }
    if (Number(e) < Date.now() / 1000) {
        return '';
    }
    const mac = crypto.createHmac('sha256', secret).update(e + r.uri).digest('base64url');
    return equal(mac, s) ? '1' : '';
}

export default {signed};
