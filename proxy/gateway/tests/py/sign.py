"""Signs webhook deliveries the way each provider does, for the webhook tests.

Reads a JSON list of {"provider", "secret", "body", "timestamp"?, "id"?} on
stdin and prints a JSON list of header maps, one per item.

- stripe: the official SDK (PyPI `stripe`), WebhookSignature.generate_signature_header,
  exactly what Stripe's own libraries use to sign test payloads.
- standard: the official Standard Webhooks library (PyPI `standardwebhooks`).
- paystack: https://paystack.com/docs/payments/webhooks/#verify-event-origin
  (hex HMAC-SHA512 of the raw body, keyed with the secret key; Paystack's
  docs show exactly this computation, and it publishes no Python SDK).
- paddle: https://developer.paddle.com/webhooks/signature-verification
  (`ts=<unix>;h1=<hex HMAC-SHA256 of "<ts>:<raw body>">`, as the docs'
  manual verification steps build it).
"""
import hashlib
import hmac
import json
import sys
from datetime import datetime, timezone

import stripe
from standardwebhooks.webhooks import Webhook


def sign(item):
    provider, secret, body = item["provider"], item["secret"], item["body"]
    ts = item.get("timestamp")
    if provider == "stripe":
        return {"Stripe-Signature": stripe.WebhookSignature.generate_signature_header(body, secret, timestamp=ts)}
    if provider == "standard":
        when = datetime.fromtimestamp(ts, tz=timezone.utc)
        return {
            "webhook-id": item["id"],
            "webhook-timestamp": str(ts),
            "webhook-signature": Webhook(secret).sign(item["id"], when, body),
        }
    if provider == "paystack":
        digest = hmac.new(secret.encode(), body.encode(), hashlib.sha512).hexdigest()
        return {"x-paystack-signature": digest}
    if provider == "paddle":
        h1 = hmac.new(secret.encode(), f"{ts}:{body}".encode(), hashlib.sha256).hexdigest()
        return {"Paddle-Signature": f"ts={ts};h1={h1}"}
    raise SystemExit(f"unknown provider {provider}")


print(json.dumps([sign(i) for i in json.load(sys.stdin)]))
