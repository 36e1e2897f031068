"""JWTs for the JWT tests, made by PyJWT (PyPI `pyjwt[crypto]`).

usage:
  jwt_tokens.py keys DIR      RSA keys k1, k2 (DIR/k1.key, k1.pub.pem, ...),
                              DIR/jwks_k1.json and DIR/jwks_k1k2.json
  jwt_tokens.py tokens        stdin: a JSON list of {"alg", "key", "kid"?,
                              "claims"}; prints the tokens as a JSON list.
                              key: "secret:<text>", "rsa:<private PEM path>",
                              "none", or "hmac-with-pem:<public PEM path>"

"hmac-with-pem" is the algorithm-confusion attack: an HS256 token keyed with
the issuer's RSA public key. PyJWT refuses to make it (it will not use an
asymmetric key as an HMAC secret), so that one token is signed here with
hmac, exactly as an attacker would.
"""
import base64
import hashlib
import hmac
import json
import os
import sys

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def keys(out):
    os.makedirs(out, exist_ok=True)
    jwks = []
    for kid in ["k1", "k2"]:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        with open(os.path.join(out, f"{kid}.key"), "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        pub = key.public_key()
        with open(os.path.join(out, f"{kid}.pub.pem"), "wb") as f:
            f.write(pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        jwk = json.loads(RSAAlgorithm.to_jwk(pub))
        jwk.update({"kid": kid, "use": "sig", "alg": "RS256"})
        jwks.append(jwk)
    with open(os.path.join(out, "jwks_k1.json"), "w") as f:
        json.dump({"keys": jwks[:1]}, f)
    with open(os.path.join(out, "jwks_k1k2.json"), "w") as f:
        # An encryption key the verifier must skip, as real IdPs publish them.
        enc = dict(jwks[1], kid="enc1", use="enc", alg="RSA-OAEP")
        json.dump({"keys": jwks + [enc]}, f)


def token(spec):
    alg, key, claims = spec["alg"], spec["key"], spec["claims"]
    headers = {"kid": spec["kid"]} if spec.get("kid") else None
    if key == "none":
        return jwt.encode(claims, None, algorithm="none", headers=headers)
    if key.startswith("secret:"):
        return jwt.encode(claims, key[len("secret:"):], algorithm=alg, headers=headers)
    if key.startswith("rsa:"):
        with open(key[len("rsa:"):], "rb") as f:
            return jwt.encode(claims, f.read(), algorithm=alg, headers=headers)
    if key.startswith("hmac-with-pem:"):
        with open(key[len("hmac-with-pem:"):], "rb") as f:
            secret = f.read()
        head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        body = b64(json.dumps(claims).encode())
        sig = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
        return f"{head}.{body}.{b64(sig)}"
    raise SystemExit(f"unknown key {key}")


if sys.argv[1] == "keys":
    keys(sys.argv[2])
else:
    print(json.dumps([token(s) for s in json.load(sys.stdin)]))
