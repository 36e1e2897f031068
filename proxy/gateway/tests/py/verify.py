"""Verifies Standard Webhooks deliveries with the official library (PyPI
`standardwebhooks`), as a receiver of Tollgate's alerts would.

Reads a JSON list of {"secret", "headers", "body"} on stdin and prints a
JSON list: the verified payload of each, or {"error": "..."}.
"""
import json
import sys

from standardwebhooks.webhooks import Webhook


def verify(item):
    try:
        return Webhook(item["secret"]).verify(item["body"], item["headers"])
    except Exception as e:  # the library's WebhookVerificationError, or a bad header
        return {"error": str(e)}


print(json.dumps([verify(i) for i in json.load(sys.stdin)]))
